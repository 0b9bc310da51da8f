"""Connecting to Postgres with a bound on the wait, and saying why it failed.

libpq waits as long as the operating system lets a connection attempt hang, and psycopg
stands in 130 s for "no limit": against a server that accepts TCP and never answers,
``chatgate migrate`` hung and ``serve`` sat silent for two minutes. Every connection
chatgate opens goes through :func:`with_connect_timeout`, which adds
``connect_timeout=5`` to ``DATABASE_URL`` unless the URL (or ``PGCONNECT_TIMEOUT``)
already sets one — the standard libpq parameter, so an operator changes it there.
"""

from __future__ import annotations

import os
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from chatgate_server.usage.dberrors import describe

DEFAULT_CONNECT_TIMEOUT_S = 5
TRANSACTION_POOLING_ENV = "CHATGATE_DATABASE_TRANSACTION_POOLING"


class CannotConnect(Exception):
    """Postgres could not be reached or refused us; the message is one line, no password."""


def with_connect_timeout(database_url: str) -> str:
    """``database_url`` with ``connect_timeout`` set, unless it or the environment sets one."""
    params = conninfo_to_dict(database_url)
    if params.get("connect_timeout") or os.environ.get("PGCONNECT_TIMEOUT"):
        return database_url
    return make_conninfo(database_url, connect_timeout=DEFAULT_CONNECT_TIMEOUT_S)


def transaction_pooling_from_env() -> bool:
    """CHATGATE_DATABASE_TRANSACTION_POOLING as a flag (Settings validates it for serve)."""
    return os.environ.get(TRANSACTION_POOLING_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def session_kwargs(transaction_pooling: bool | None = None) -> dict[str, Any]:
    """psycopg connection arguments for what sits in front of Postgres.

    Behind a transaction-mode pooler (PgBouncer ``pool_mode=transaction``) consecutive
    transactions of one client connection run on different server connections, so
    nothing may live in the session. psycopg prepares a statement on the server once a
    connection has run it five times, and the next transaction, on another server
    connection, would name a statement that does not exist there (PgBouncer < 1.21, or
    ``max_prepared_statements = 0``): ``prepare_threshold=None`` never prepares. None
    reads CHATGATE_DATABASE_TRANSACTION_POOLING (for the one-shot commands).
    """
    pooled = transaction_pooling_from_env() if transaction_pooling is None else transaction_pooling
    return {"prepare_threshold": None} if pooled else {}


def cannot_connect(exc: BaseException, database_url: str) -> CannotConnect:
    return CannotConnect(f"cannot connect to the database at DATABASE_URL: {describe(exc, database_url)}")


async def connect(database_url: str, **kwargs: Any) -> psycopg.AsyncConnection[Any]:
    """One connection, within the connect timeout; CannotConnect with the cause otherwise."""
    try:
        return await psycopg.AsyncConnection.connect(
            with_connect_timeout(database_url), **{**session_kwargs(), **kwargs}
        )
    except psycopg.OperationalError as exc:
        raise cannot_connect(exc, database_url) from None
