"""Request-id reservations against real Postgres: claim, release, take-over, expiry."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
import psycopg
import pytest
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.app import App
from chatgate_server.simulator import Simulator
from chatgate_server.telemetry import NO_TELEMETRY
from chatgate_server.usage.reservations import (
    POOL_KWARGS,
    ReservationStore,
    configure,
    count_expired,
    delete_expired,
)
from tests.integration.conftest import make_settings
from tests.integration.pgproxy import running_proxy

A, B = "aa" * 16, "bb" * 16


@pytest.fixture
async def pools(migrated_database_url: str) -> AsyncIterator[list[AsyncConnectionPool[AsyncConnection[Any]]]]:
    made = [
        AsyncConnectionPool(
            migrated_database_url, min_size=1, max_size=4, open=False, kwargs=POOL_KWARGS, configure=configure
        )
        for _ in range(2)
    ]
    for pool in made:
        await pool.open(wait=True)
    yield made
    for pool in made:
        await pool.close()


def rid() -> str:
    return f"res-{uuid.uuid4().hex}"


async def test_an_id_is_won_once_and_the_loser_learns_the_holder(pools: list[Any]) -> None:
    store = ReservationStore(pools[0], window=timedelta(hours=1))
    request_id = rid()
    assert (await store.claim(request_id, A)).won
    lost = await store.claim(request_id, B)
    assert not lost.won and lost.holder == A
    assert not (await store.claim(request_id, A)).won  # in progress or served


async def test_a_released_id_goes_to_the_same_content_only(pools: list[Any]) -> None:
    store = ReservationStore(pools[0], window=timedelta(hours=1))
    request_id = rid()
    await store.claim(request_id, A)
    await store.release(request_id, A)
    assert not (await store.claim(request_id, B)).won
    assert (await store.claim(request_id, A)).won
    assert not (await store.claim(request_id, A)).won  # taken again, not released


async def test_two_processes_claiming_the_same_ids_at_once_win_each_id_once(pools: list[Any]) -> None:
    first, second = (ReservationStore(p, window=timedelta(hours=1)) for p in pools)
    ids = [rid() for _ in range(200)]
    claims = await asyncio.gather(
        *(first.claim(i, A) for i in ids), *(second.claim(i, B) for i in reversed(ids))
    )
    by_id: dict[str, int] = {}
    for request_id, claim in zip([*ids, *reversed(ids)], claims, strict=True):
        by_id[request_id] = by_id.get(request_id, 0) + claim.won
    assert by_id == dict.fromkeys(ids, 1)


async def test_expired_reservations_are_taken_over_and_deleted_by_retention(
    pools: list[Any], db: psycopg.Connection[Any]
) -> None:
    store = ReservationStore(pools[0], window=timedelta(hours=1))
    old, fresh = rid(), rid()
    await store.claim(old, A)
    await store.claim(fresh, A)
    db.execute(
        "UPDATE request_id_reservations SET reserved_at = now() - interval '2 hours' WHERE request_id = %s",
        [old],
    )
    assert (await store.claim(old, B)).won  # expired: cleanup on insert
    db.execute(
        "UPDATE request_id_reservations SET reserved_at = now() - interval '2 hours' WHERE request_id = %s",
        [old],
    )
    async with await AsyncConnection.connect(pools[0].conninfo, autocommit=True) as conn:
        assert await count_expired(conn, timedelta(hours=1)) >= 1
        assert await delete_expired(conn, timedelta(hours=1)) >= 1
        assert await count_expired(conn, timedelta(hours=1)) == 0
    left = db.execute(
        "SELECT request_id FROM request_id_reservations WHERE request_id = ANY(%s)", [[old, fresh]]
    ).fetchall()
    assert left == [(fresh,)]


async def test_reservation_connections_do_not_wait_for_wal_flushes(pools: list[Any]) -> None:
    async with pools[0].connection() as conn:
        cur = await conn.execute("SHOW synchronous_commit")
        assert await cur.fetchone() == ("off",)
        assert conn.autocommit


async def test_with_postgres_away_a_call_with_its_own_id_is_served_without_a_long_wait(
    migrated_database_url: str, simulator: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_proxy(migrated_database_url) as proxy:
        app = App(
            make_settings(proxy.url_for(migrated_database_url), simulator.base_url), telemetry=NO_TELEMETRY
        )
        await app.start()
        try:
            proxy.cut()  # the ledger has written nothing yet: it still believes Postgres is there
            req = pb.CompleteRequest(
                model="gpt-4o-mini",
                user_id="res-user",
                request_id=rid(),
                messages=[pb.Message(role=pb.ROLE_USER, text="Hello!")],
            )
            started = time.monotonic()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                events = [e async for e in chat_pb2_grpc.ChatServiceStub(channel).Complete(req, timeout=30)]
            waited = time.monotonic() - started
        finally:
            proxy.restore()
            await app.stop(0)
    # Guarded by this process only (fail open), after at most the reservation's timeout.
    assert events[-1].finished.outcome == pb.OUTCOME_COMPLETED
    assert waited < 5.0
    assert "guarded by this process only" in caplog.text
