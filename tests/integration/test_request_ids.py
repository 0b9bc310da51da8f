"""Caller-supplied request ids end to end: a retry goes through, a reuse gets ALREADY_EXISTS,
and either way the id keys exactly one usage row."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import psycopg
import pytest

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.app import App
from chatgate_server.usage.reservations import Claim
from tests.integration.conftest import AppFactory


def request(request_id: str, text: str = "Hello!", model: str = "gpt-4o-mini") -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model=model,
        user_id="idem-user",
        request_id=request_id,
        messages=[pb.Message(role=pb.ROLE_USER, text=text)],
    )


async def complete(app: App, req: pb.CompleteRequest) -> list[pb.CompleteResponse]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        return [e async for e in stub.Complete(req, timeout=30)]


async def refused(app: App, req: pb.CompleteRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await complete(app, req)
    return info.value


async def rows(app: App, db: psycopg.Connection[Any], request_id: str) -> list[tuple[Any, ...]]:
    assert app.ledger is not None
    await app.ledger.flush()
    return db.execute(
        "SELECT outcome, grpc_status, request_fingerprint IS NOT NULL"
        " FROM usage_records WHERE request_id = %s",
        [request_id],
    ).fetchall()


@pytest.fixture
def rid() -> str:
    return f"caller-{uuid.uuid4().hex}"


@pytest.fixture
async def gate(start_app: AppFactory) -> AsyncIterator[App]:
    # One upstream attempt per call, so a 500 reaches the caller, whose retry is the test.
    yield await start_app(retry_max_attempts=1)


async def test_reusing_an_id_for_a_different_request_is_already_exists(
    gate: App, db: psycopg.Connection[Any], rid: str
) -> None:
    first = await complete(gate, request(rid))
    assert first[-1].finished.outcome == pb.OUTCOME_COMPLETED

    error = await refused(gate, request(rid, text="Something else entirely"))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "different request" in (error.details() or "")
    # Not merged: the id's one row is the first request's.
    assert await rows(gate, db, rid) == [("completed", "OK", True)]


async def test_a_served_request_cannot_be_run_again_under_its_id(
    gate: App, db: psycopg.Connection[Any], rid: str
) -> None:
    await complete(gate, request(rid))
    error = await refused(gate, request(rid))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "already served" in (error.details() or "")
    assert await rows(gate, db, rid) == [("completed", "OK", True)]


async def test_a_retry_after_a_failure_before_the_first_event_runs_and_leaves_one_row(
    gate: App, db: psycopg.Connection[Any], rid: str
) -> None:
    # The simulator fails the first attempt it sees for this request id, then succeeds.
    req = request(rid, model="gpt-4o-mini::status=500,times=1")
    error = await refused(gate, req)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert await rows(gate, db, rid) == [("upstream_error", "UNAVAILABLE", True)]

    events = await complete(gate, req)  # the caller's retry: same id, same request
    assert events[0].started.request_id == rid
    assert events[-1].finished.outcome == pb.OUTCOME_COMPLETED
    # The retry's row superseded the failed attempt's: one row per request id.
    assert await rows(gate, db, rid) == [("completed", "OK", True)]


async def test_a_concurrent_call_with_an_id_in_progress_is_refused(
    gate: App, db: psycopg.Connection[Any], rid: str
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gate.port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        slow = stub.Complete(request(rid, model="gpt-4o-mini::chunks=30,delay_ms=20"), timeout=30)
        first = await slow.read()
        assert isinstance(first, pb.CompleteResponse) and first.HasField("started")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Complete(
                request(rid, model="gpt-4o-mini::chunks=30,delay_ms=20"), timeout=30
            ):
                pass
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "in progress" in (info.value.details() or "")
        while await slow.read() is not grpc.aio.EOF:
            pass
    assert await rows(gate, db, rid) == [("completed", "OK", True)]


async def test_another_replica_finds_the_earlier_request_in_postgres(
    start_app: AppFactory, db: psycopg.Connection[Any], rid: str
) -> None:
    first_replica = await start_app()
    await complete(first_replica, request(rid))
    assert first_replica.ledger is not None
    await first_replica.ledger.flush()

    second_replica = await start_app()  # knows nothing in memory
    different = await refused(second_replica, request(rid, text="Another question"))
    assert different.code() == grpc.StatusCode.ALREADY_EXISTS
    same = await refused(second_replica, request(rid))
    assert same.code() == grpc.StatusCode.ALREADY_EXISTS
    assert await rows(second_replica, db, rid) == [("completed", "OK", True)]


async def test_generated_ids_are_never_looked_up(gate: App, db: psycopg.Connection[Any]) -> None:
    guard = gate._guard
    assert guard is not None
    lookups: list[str] = []
    reservations = guard._reservations
    original = reservations.claim

    async def counting(request_id: str, fp: str) -> Claim:
        lookups.append(request_id)
        return await original(request_id, fp)

    reservations.claim = counting  # type: ignore[method-assign,assignment]
    results = await asyncio.gather(*(complete(gate, request("")) for _ in range(20)))
    assert all(r[-1].finished.outcome == pb.OUTCOME_COMPLETED for r in results)
    assert lookups == []  # no Postgres round trip on the hot path without a caller id
    await complete(gate, request(f"caller-{uuid.uuid4().hex}"))
    assert len(lookups) == 1


async def test_a_retry_on_another_replica_right_after_a_failure_runs_and_leaves_one_row(
    start_app: AppFactory, db: psycopg.Connection[Any], rid: str
) -> None:
    first_replica = await start_app(retry_max_attempts=1)
    second_replica = await start_app(retry_max_attempts=1)
    req = request(rid, model="gpt-4o-mini::status=500,times=1")
    error = await refused(first_replica, req)
    assert error.code() == grpc.StatusCode.UNAVAILABLE

    # At once, elsewhere: other content is still refused, the same request runs.
    different = await refused(second_replica, request(rid, text="Another question"))
    assert "different request" in (different.details() or "")
    events = await complete(second_replica, req)
    assert events[-1].finished.outcome == pb.OUTCOME_COMPLETED
    await rows(first_replica, db, rid)  # flushes the first replica's ledger
    assert await rows(second_replica, db, rid) == [("completed", "OK", True)]
