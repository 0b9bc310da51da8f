"""Throwaway Postgres databases: one created on the server of an admin URL, dropped
afterwards. Shared by the test fixtures that need a database of their own and by the
benchmarks and the soak (bench/), so the create/derive/drop steps live in one place."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo


@contextlib.contextmanager
def throwaway_database(admin_url: str, prefix: str, *, migrate: bool = False) -> Iterator[str]:
    """A new database named ``<prefix>_<random>`` beside ``admin_url``'s; its URL is
    yielded (migrated first if ``migrate``) and the database is dropped on exit, open
    connections and all."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(admin_url)
    params["dbname"] = name
    url = make_conninfo(**params)  # type: ignore[arg-type]
    try:
        if migrate:
            from chatgate_server.usage.migrate import apply_migrations

            apply_migrations(url)
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
