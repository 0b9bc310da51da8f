"""The callers and their credentials in Postgres (schema: migration 0006).

Reads serve the in-memory caller table; writes serve the ``chatgate callers``
commands. Every write runs in one transaction, so a rotation (new token, old one
given its grace) is seen whole or not at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from chatgate_server.auth import tokens
from chatgate_server.auth.records import Credential

Pool = AsyncConnectionPool[AsyncConnection[Any]]

_SELECT_CREDENTIALS = """
    SELECT c.public_id, c.tenant, c.caller_name, k.roles, k.allowed_models, c.token_sha256,
           c.created_at, c.expires_at, c.revoked_at, c.cert_identity
    FROM caller_credentials c JOIN callers k ON (k.tenant, k.name) = (c.tenant, c.caller_name)
"""


class CallerExists(Exception):
    """``callers create`` for a tenant and name that already exist."""


class CallerNotFound(Exception):
    """No such caller (or credential)."""


@dataclass(frozen=True, slots=True)
class NewCaller:
    tenant: str
    name: str
    roles: frozenset[str] = frozenset()
    allowed_models: tuple[str, ...] | None = None
    expires_at: datetime | None = None
    # Set: the caller proves itself with this client-certificate identity, no token.
    cert_identity: str | None = None


class CallerStore:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def version(self) -> int:
        async with self._pool.connection() as conn:
            row = await (await conn.execute("SELECT version FROM caller_table_version")).fetchone()
        return int(row[0]) if row else 0

    async def credentials(self, tenant: str | None = None) -> list[Credential]:
        query = _SELECT_CREDENTIALS + (" WHERE c.tenant = %s" if tenant else "") + " ORDER BY c.created_at"
        async with self._pool.connection() as conn:
            rows = await (await conn.execute(query, (tenant,) if tenant else ())).fetchall()
        return [_credential(row) for row in rows]

    async def create(self, new: NewCaller) -> tokens.Token | None:
        """A new caller with its first credential: a token (returned once; only its hash
        is kept), or the certificate identity of ``new`` (then None)."""
        token = tokens.mint()
        async with self._pool.connection() as conn, conn.transaction():
            inserted = await conn.execute(
                "INSERT INTO callers (tenant, name, roles, allowed_models) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT DO NOTHING",
                (new.tenant, new.name, sorted(new.roles), _models(new.allowed_models)),
            )
            if inserted.rowcount == 0:
                raise CallerExists(f"caller {new.tenant}/{new.name} already exists")
            if new.cert_identity is not None:
                await conn.execute(
                    "INSERT INTO caller_credentials (public_id, tenant, caller_name, cert_identity,"
                    " expires_at) VALUES (%s, %s, %s, %s, %s)",
                    (token.public_id, new.tenant, new.name, new.cert_identity, new.expires_at),
                )
                return None
            await _add_token(conn, new.tenant, new.name, token, new.expires_at)
        return token

    async def rotate(
        self, tenant: str, name: str, *, grace: timedelta, expires_at: datetime | None
    ) -> tokens.Token:
        """A new token for the caller; its other live tokens expire after ``grace``."""
        token = tokens.mint()
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(
                "UPDATE caller_credentials SET expires_at = LEAST(coalesce(expires_at, 'infinity'),"
                " now() + %s) WHERE tenant = %s AND caller_name = %s AND revoked_at IS NULL"
                " AND token_sha256 IS NOT NULL",
                (grace, tenant, name),
            )
            exists = await (
                await conn.execute("SELECT 1 FROM callers WHERE tenant = %s AND name = %s", (tenant, name))
            ).fetchone()
            if exists is None:
                raise CallerNotFound(f"no caller {tenant}/{name}")
            await _add_token(conn, tenant, name, token, expires_at)
        return token

    async def revoke(self, tenant: str, name: str, public_ids: Sequence[str] = ()) -> int:
        """Revoke the caller's credentials (only ``public_ids`` if given); how many."""
        query = (
            "UPDATE caller_credentials SET revoked_at = now()"
            " WHERE tenant = %s AND caller_name = %s AND revoked_at IS NULL"
        )
        params: tuple[Any, ...] = (tenant, name)
        if public_ids:
            query += " AND public_id = ANY(%s)"
            params += (list(public_ids),)
        async with self._pool.connection() as conn:
            result = await conn.execute(query, params)
        return result.rowcount


async def _add_token(
    conn: AsyncConnection[Any], tenant: str, name: str, token: tokens.Token, expires_at: datetime | None
) -> None:
    await conn.execute(
        "INSERT INTO caller_credentials (public_id, tenant, caller_name, token_sha256, expires_at)"
        " VALUES (%s, %s, %s, %s, %s)",
        (token.public_id, tenant, name, tokens.digest(token.secret), expires_at),
    )


def _models(models: tuple[str, ...] | None) -> list[str] | None:
    return list(models) if models is not None else None


def _credential(row: Sequence[Any]) -> Credential:
    public_id, tenant, name, roles, models, digest, created, expires, revoked, identity = row
    return Credential(
        public_id=public_id,
        tenant=tenant,
        caller_name=name,
        roles=frozenset(roles),
        allowed_models=tuple(models) if models is not None else None,
        token_sha256=bytes(digest) if digest is not None else None,
        created_at=created,
        expires_at=expires,
        revoked_at=revoked,
        cert_identity=identity,
    )
