"""Limits while Postgres is away: admit against the slices held, then this process's
share of each limit (never unlimited, never nothing); reconcile when it is back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
import pytest

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.app import App
from chatgate_server.simulator import Simulator
from chatgate_server.telemetry import NO_TELEMETRY
from tests.integration.conftest import make_settings
from tests.integration.pgproxy import PgProxy, running_proxy

if TYPE_CHECKING:
    from chatgate.v1.chat_pb2_grpc import ChatServiceAsyncStub

MAX_TOKENS = 50


@pytest.fixture
async def proxy(migrated_database_url: str) -> AsyncIterator[PgProxy]:
    async with running_proxy(migrated_database_url) as p:
        yield p


async def complete(stub: ChatServiceAsyncStub, user: str) -> tuple[grpc.StatusCode, int]:
    """The call's status and the tokens its final event says it used."""
    req = pb.CompleteRequest(
        model="gpt-4o-mini",
        user_id=user,
        max_completion_tokens=MAX_TOKENS,
        messages=[pb.Message(role=pb.ROLE_USER, text="Name a colour.")],
    )
    used = 0
    try:
        async for event in stub.Complete(req, timeout=30):
            if event.WhichOneof("event") == "finished":
                used = event.finished.usage.total_tokens
    except grpc.aio.AioRpcError as exc:
        return exc.code(), 0
    return grpc.StatusCode.OK, used


def pool_taken(db: psycopg.Connection[Any], user: str) -> int:
    row = db.execute(
        "SELECT coalesce(sum(taken), 0) FROM limit_pools WHERE pool LIKE %s", (f"%|{user}|%",)
    ).fetchone()
    return int(row[0]) if row else 0


async def test_postgres_away_admits_the_share_then_reconciles(
    migrated_database_url: str, proxy: PgProxy, simulator: Simulator, db: psycopg.Connection[Any]
) -> None:
    user = f"u-{uuid.uuid4().hex[:10]}"
    db.execute(
        "INSERT INTO limits (scope, tenant, subject, kind, amount)"
        " VALUES ('user', 'default', %s, 'tokens_per_day', 2000)",
        (user,),
    )
    app = App(
        make_settings(proxy.url_for(migrated_database_url), simulator.base_url, retry_max_attempts=1),
        telemetry=NO_TELEMETRY,
    )
    await app.start()
    try:
        assert app.limits is not None and app.limits.table.loaded
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            first, used = await complete(stub, user)
            assert first == grpc.StatusCode.OK
            proxy.cut()

            results = [await complete(stub, user) for _ in range(120)]

            codes = [code for code, _ in results]
            used += sum(tokens for _, tokens in results)
            leaser = app.limits.leaser
            assert leaser.away
            admitted = codes.count(grpc.StatusCode.OK)
            assert admitted > 0, "Postgres away must not refuse everything"
            # Never unlimited: this process's share (2000 tokens ÷ the live processes it
            # last counted) ran out; ~25 tokens a call, 120 calls would need 3000.
            assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert used <= 2000 // leaser.live + 2 * (MAX_TOKENS + 20)

            proxy.restore()
            # Reconciled: what was spent meanwhile reaches the shared pool.
            for _ in range(100):
                if not leaser.away and pool_taken(db, user) >= used:
                    break
                await asyncio.sleep(0.1)
            assert not leaser.away
            assert pool_taken(db, user) >= used
    finally:
        await app.stop(0)
