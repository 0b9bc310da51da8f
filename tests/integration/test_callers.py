"""Callers and tokens on real Postgres: the CLI, the in-memory table, and two processes'
tables seeing a revocation within seconds."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from psycopg_pool import AsyncConnectionPool

from chatgate_server.auth.store import CallerStore
from chatgate_server.auth.table import CallerTable, CallerTableNotLoaded
from chatgate_server.errors import CredentialExpired, CredentialInvalid, CredentialRevoked


def callers_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatgate_server", "callers", *args],
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
async def pool(migrated_database_url: str) -> AsyncIterator[AsyncConnectionPool]:
    async with AsyncConnectionPool(migrated_database_url, min_size=1, max_size=2, open=False) as pool:
        await pool.open(wait=True, timeout=10)
        yield pool


def tenant() -> str:
    return f"t-{time.monotonic_ns()}"


async def test_a_created_token_is_printed_once_and_verified_by_the_table(
    migrated_database_url: str,
    pool: AsyncConnectionPool,
) -> None:
    acme = tenant()
    created = callers_cli(migrated_database_url, "create", "--tenant", acme, "--name", "billing-api")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("cgt_") and "\n" not in token
    assert "not shown again" in created.stderr

    table = CallerTable(CallerStore(pool))
    await table.refresh()
    caller = table.verify_token(token)
    assert (caller.tenant, caller.service) == (acme, "billing-api")
    assert caller.credential_id and caller.credential_id in token

    listing = callers_cli(migrated_database_url, "list", "--tenant", acme)
    assert listing.returncode == 0, listing.stderr
    assert caller.credential_id in listing.stdout and "active" in listing.stdout
    assert token.split("_", 2)[2] not in listing.stdout

    again = callers_cli(migrated_database_url, "create", "--tenant", acme, "--name", "billing-api")
    assert again.returncode == 1 and "already exists" in again.stderr


async def test_unknown_and_malformed_tokens_are_invalid(pool: AsyncConnectionPool) -> None:
    table = CallerTable(CallerStore(pool))
    with pytest.raises(CallerTableNotLoaded):
        table.verify_token("cgt_" + "a" * 16 + "_" + "b" * 43)
    await table.refresh()
    for text in ("cgt_" + "a" * 16 + "_" + "b" * 43, "not-a-token", ""):
        with pytest.raises(CredentialInvalid):
            table.verify_token(text)


async def test_rotation_keeps_the_old_token_for_its_grace_then_expires_it(
    migrated_database_url: str,
    pool: AsyncConnectionPool,
) -> None:
    acme = tenant()
    old = callers_cli(migrated_database_url, "create", "--tenant", acme, "--name", "api").stdout.strip()
    rotated = callers_cli(migrated_database_url, "rotate", "--tenant", acme, "--name", "api", "--grace", "1h")
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    assert new != old

    now = datetime.now(UTC)
    table = CallerTable(CallerStore(pool), clock=lambda: now)
    await table.refresh()
    assert table.verify_token(old).service == table.verify_token(new).service == "api"
    now += timedelta(hours=1, seconds=1)
    with pytest.raises(CredentialExpired):
        table.verify_token(old)
    assert table.verify_token(new).tenant == acme


async def test_two_processes_see_a_revocation_within_seconds(
    migrated_database_url: str,
    pool: AsyncConnectionPool,
) -> None:
    acme = tenant()
    token = callers_cli(migrated_database_url, "create", "--tenant", acme, "--name", "api").stdout.strip()
    async with AsyncConnectionPool(migrated_database_url, min_size=1, max_size=1, open=False) as other:
        await other.open(wait=True, timeout=10)
        tables = [CallerTable(CallerStore(pool), poll_s=0.2), CallerTable(CallerStore(other), poll_s=0.2)]
        for table in tables:
            await table.start()
        try:
            for table in tables:
                table.verify_token(token)
            revoked = callers_cli(migrated_database_url, "revoke", "--tenant", acme, "--name", "api")
            assert revoked.returncode == 0, revoked.stderr
            started = time.monotonic()
            for table in tables:
                while True:
                    try:
                        table.verify_token(token)
                    except CredentialRevoked:
                        break
                    assert time.monotonic() - started < 5, "a revocation took more than 5 s to apply"
                    await asyncio.sleep(0.05)
        finally:
            for table in tables:
                await table.stop()


async def test_a_certificate_identity_maps_to_its_caller_and_makes_no_token(
    migrated_database_url: str, pool: AsyncConnectionPool
) -> None:
    acme = tenant()
    identity = f"spiffe://{acme}.example/reports"
    created = callers_cli(
        migrated_database_url, "create", "--tenant", acme, "--name", "reports", "--certificate", identity
    )
    assert created.returncode == 0, created.stderr
    assert "cgt_" not in created.stdout + created.stderr
    table = CallerTable(CallerStore(pool))
    await table.refresh()
    assert table.verify_certificate(identity).service == "reports"
    with pytest.raises(CredentialInvalid):
        table.verify_certificate("spiffe://elsewhere/reports")
    callers_cli(migrated_database_url, "revoke", "--tenant", acme, "--name", "reports")
    await table.refresh()
    with pytest.raises(CredentialRevoked):
        table.verify_certificate(identity)
