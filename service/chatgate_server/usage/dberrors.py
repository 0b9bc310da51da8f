"""What a database error means: a bad record, Postgres away, or a setting to fix — and
how to say so in one line.

The ledger must tell a record Postgres refuses for what it holds (retrying the same row
can never succeed: dead-letter it) from Postgres being away or stuck (retry later, keep
the row in the spool). psycopg's exception classes do not draw that line: a
program-limit error (SQLSTATE 54000, "index row size exceeds btree maximum") is an
``OperationalError``, like a lost connection. The SQLSTATE class does:

- ``22`` data exception (a value out of range, an invalid encoding),
- ``23`` integrity constraint violation (a CHECK, NOT NULL),
- ``54`` program limit exceeded (an index row or a statement too large)

are about the record. Everything else with an SQLSTATE — ``08`` connection exceptions,
``53`` insufficient resources, ``57`` operator intervention (admin shutdown, a
cancelled statement), ``40`` transaction rollback, ``42`` (a missing table: an
unmigrated database) — and every error without one (connection refused, timeouts) is
an outage. An exception that is neither a psycopg error nor an OS error or timeout is a
bug tied to the record (its values could not even be sent): a bad record too.
"""

from __future__ import annotations

import re

import psycopg
from psycopg.conninfo import conninfo_to_dict

_BAD_RECORD_CLASSES = frozenset({"22", "23", "54"})


def is_bad_record(exc: BaseException) -> bool:
    """Whether retrying the same records cannot fix ``exc`` (as opposed to Postgres being away)."""
    if isinstance(exc, psycopg.Error):
        if exc.sqlstate:
            return exc.sqlstate[:2] in _BAD_RECORD_CLASSES
        # Refused client-side before anything was sent (a value psycopg cannot adapt).
        return isinstance(exc, psycopg.DataError | psycopg.IntegrityError)
    return not isinstance(exc, OSError | TimeoutError)


_SPACE = re.compile(r"\s+")


def describe(exc: BaseException, database_url: str | None = None, *, limit: int = 300) -> str:
    """``exc`` as one line: its class and libpq's reason (host, port, database or user
    and what went wrong), never the password of ``database_url``."""
    message = _SPACE.sub(" ", str(exc)).strip()
    if database_url:
        try:
            password = conninfo_to_dict(database_url).get("password")
        except psycopg.Error:
            password = None
        if password:
            message = message.replace(str(password), "********")
    if isinstance(exc, psycopg.errors.ConnectionTimeout) and database_url:
        # psycopg says only "connection timeout expired": name what did not answer.
        message += f" (no answer from {_server(database_url)})"
    if len(message) > limit:
        message = message[: limit - 1] + "…"
    name = type(exc).__name__
    if isinstance(exc, TimeoutError) and not message:
        message = "no answer in time"
    return f"{name}: {message}" if message else name


def _server(database_url: str) -> str:
    try:
        params = conninfo_to_dict(database_url)
    except psycopg.Error:
        return "the server"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    return f"{host}:{params.get('port') or 5432} within connect_timeout"
