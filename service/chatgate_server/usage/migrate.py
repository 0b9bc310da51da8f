"""Schema migrations: numbered SQL files applied in order, each exactly once.

The files live in ``migrations/`` next to this module, named ``NNNN_name.sql``, and ship
inside the package (read with :mod:`importlib.resources`). Applied versions are recorded
in ``schema_migrations``. A file is never edited once shipped; a change is a new file.

Why a hand-written runner: the migrations are plain SQL and the runner's whole job is
"list files, take a lock, apply the missing ones one transaction each, record them" —
about forty lines. Alembic would bring SQLAlchemy, an ``env.py`` and a second way of
describing the schema, for none of which this project has a use.

Two replicas may run this at the same moment (``CHATGATE_MIGRATE_ON_START``): each
migration's transaction takes a transaction-level advisory lock and reads what is
applied under it, so the second runner waits, then finds nothing left to do. Nothing is
held in the session, so this works through a transaction-mode pooler (PgBouncer).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

from chatgate_server.usage.connect import session_kwargs, with_connect_timeout

log = logging.getLogger(__name__)

# pg_advisory_lock key for the runner: b"cgmigrat" as a bigint. Fixed, so that every
# replica and every version of chatgate serialises on the same lock.
MIGRATION_LOCK_KEY = 7162814031830606196

_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")

_CREATE_LEDGER = """
    CREATE TABLE IF NOT EXISTS schema_migrations (
        version    integer     PRIMARY KEY,
        name       text        NOT NULL,
        applied_at timestamptz NOT NULL DEFAULT now()
    )
"""


class MigrationError(Exception):
    """The migration files or the recorded history are inconsistent."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One SQL file: its version number, its name (the file stem) and its text."""

    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """The packaged migrations, ordered by version; a misnamed file is an error."""
    folder = resources.files("chatgate_server.usage").joinpath("migrations")
    found: dict[int, Migration] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(entry.name)
        if match is None:
            raise MigrationError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        version = int(match["version"])
        if version in found:
            raise MigrationError(f"two migration files have version {version:04d}")
        found[version] = Migration(version, entry.name.removesuffix(".sql"), entry.read_text("utf-8"))
    return [found[v] for v in sorted(found)]


def _applied(conn: psycopg.Connection[Any]) -> dict[int, str]:
    row = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return {}
    rows = conn.execute("SELECT version, name FROM schema_migrations").fetchall()
    return {int(version): str(name) for version, name in rows}


def _pending(migrations: list[Migration], applied: dict[int, str]) -> list[Migration]:
    for m in migrations:
        if m.version in applied and applied[m.version] != m.name:
            raise MigrationError(
                f"version {m.version:04d} was applied as {applied[m.version]!r} but the file is {m.name!r}"
            )
    return [m for m in migrations if m.version not in applied]


def pending_migrations(database_url: str) -> list[str]:
    """Names of the packaged migrations not yet applied to this database, in order."""
    with psycopg.connect(with_connect_timeout(database_url), autocommit=True, **session_kwargs()) as conn:
        return [m.name for m in _pending(load_migrations(), _applied(conn))]


def apply_migrations(database_url: str) -> list[str]:
    """Apply the pending migrations, each in its own transaction; return their names.

    Safe to run concurrently from several processes, and a no-op when nothing is
    pending. A failing migration rolls back alone (earlier ones stay applied) and its
    error propagates.
    """
    migrations = load_migrations()
    applied_now: list[str] = []
    with psycopg.connect(with_connect_timeout(database_url), autocommit=True, **session_kwargs()) as conn:
        with conn.transaction():
            _lock(conn)
            # Created under the lock: concurrent CREATE TABLE IF NOT EXISTS can still
            # collide in the catalog.
            conn.execute(_CREATE_LEDGER)
        while True:
            with conn.transaction():
                _lock(conn)
                pending = _pending(migrations, _applied(conn))
                if not pending:
                    break
                m = pending[0]
                # bytes: the file is sent as is (several statements, no parameters).
                conn.execute(m.sql.encode("utf-8"))
                conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", [m.version, m.name]
                )
            log.info("applied migration %s", m.name)
            applied_now.append(m.name)
    return applied_now


def _lock(conn: psycopg.Connection[Any]) -> None:
    """The runners' lock, held until the end of the current transaction: a session lock
    would be taken on one server connection and released on another behind a
    transaction pooler, and so never released."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", [MIGRATION_LOCK_KEY])


# libpq reports a server's refusal as "FATAL:  <reason>"; these reasons are settings to
# fix (wrong database, user, password, pg_hba), not an outage to ride out.
_REFUSALS = ("does not exist", "authentication failed", "pg_hba.conf", "permission denied")


def database_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` from connecting means Postgres is away (down, restarting, the
    network) rather than refusing us because of a setting."""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    message = str(exc)
    return not ("FATAL" in message and any(reason in message for reason in _REFUSALS))
