"""Limits on a real server: budgets, rates and concurrency as a caller meets them.

Each test limits its own user of the anonymous tenant (authentication is off here), so
the limits never touch other tests' calls. Limits are written to Postgres as
``chatgate limits set`` writes them; the test then reloads the app's limit table at
once rather than waiting for its one-second poll.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.app import App
from chatgate_server.domain import ChatMessage, CompletionRequest, TokenUsage
from chatgate_server.simulator import Simulator
from chatgate_server.telemetry import NO_TELEMETRY
from chatgate_server.usage.pricing import default_table
from chatgate_server.usage.tokens import TiktokenEstimator
from tests.integration.conftest import make_settings

if TYPE_CHECKING:
    from chatgate.v1.chat_pb2_grpc import ChatServiceAsyncStub

TENANT = "default"  # the anonymous caller's tenant
PROMPT = "Say something kind about foxes."


@pytest.fixture
async def slow_simulator() -> AsyncIterator[Simulator]:
    """Streams of 5 chunks 100 ms apart: calls stay in flight while others arrive."""
    sim = Simulator(chunks=5, delay_ms=100)
    await sim.start(host="127.0.0.1", port=0)
    try:
        yield sim
    finally:
        await sim.stop()


@pytest.fixture
async def limited(migrated_database_url: str, slow_simulator: Simulator) -> AsyncIterator[App]:
    app = App(
        make_settings(migrated_database_url, slow_simulator.base_url, retry_max_attempts=1),
        telemetry=NO_TELEMETRY,
    )
    await app.start()
    try:
        yield app
    finally:
        await app.stop(0)


@pytest.fixture
async def chat(limited: App) -> AsyncIterator[ChatServiceAsyncStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.port}") as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


def new_user() -> str:
    return f"u-{uuid.uuid4().hex[:10]}"


async def set_limit(app: App, db: psycopg.Connection[Any], user: str, kind: str, amount: int) -> None:
    db.execute(
        "INSERT INTO limits (scope, tenant, subject, kind, amount, set_by)"
        " VALUES ('user', %s, %s, %s, %s, 'test')",
        (TENANT, user, kind, amount),
    )
    assert app.limits is not None
    await app.limits.table.refresh()


def request(user: str, *, model: str = "gpt-4o-mini", max_tokens: int | None = 100) -> pb.CompleteRequest:
    req = pb.CompleteRequest(model=model, user_id=user, messages=[pb.Message(role=pb.ROLE_USER, text=PROMPT)])
    if max_tokens is not None:
        req.max_completion_tokens = max_tokens
    return req


def reservation_tokens(max_tokens: int, model: str = "gpt-4o-mini") -> int:
    domain = CompletionRequest("x", model, (ChatMessage("user", PROMPT),), "u")
    return TiktokenEstimator().estimate(domain, ()).input_tokens + max_tokens


def reservation_micros(max_tokens: int) -> int:
    input_tokens = reservation_tokens(max_tokens) - max_tokens
    cost = default_table().cost(
        "gpt-4o-mini", TokenUsage(input_tokens=input_tokens, output_tokens=max_tokens)
    )
    assert cost.usd_micros is not None
    return cost.usd_micros


async def complete(
    stub: ChatServiceAsyncStub, req: pb.CompleteRequest
) -> list[pb.CompleteResponse] | grpc.aio.AioRpcError:
    try:
        return [event async for event in stub.Complete(req, timeout=30)]
    except grpc.aio.AioRpcError as exc:
        return exc


def quota(error: grpc.aio.AioRpcError) -> tuple[str, float | None, list[tuple[str, str]]]:
    """ErrorInfo reason, RetryInfo seconds (None when absent), QuotaFailure violations."""
    status = rpc_status.from_call(error)
    assert status is not None
    info, retry, failure = (
        error_details_pb2.ErrorInfo(),
        error_details_pb2.RetryInfo(),
        error_details_pb2.QuotaFailure(),
    )
    has_retry = False
    for detail in status.details:
        detail.Unpack(info)
        has_retry |= detail.Unpack(retry)
        detail.Unpack(failure)
    delay = retry.retry_delay.ToTimedelta().total_seconds() if has_retry else None
    return info.reason, delay, [(v.subject, v.description) for v in failure.violations]


async def rows(app: App, db: psycopg.Connection[Any], user: str) -> list[tuple[str, int, int | None]]:
    assert app.ledger is not None
    await app.ledger.flush()
    cur = db.execute(
        "SELECT outcome, total_tokens, cost_usd_micros FROM usage_records"
        " WHERE user_id = %s ORDER BY started_at",
        (user,),
    )
    return [(str(r[0]), int(r[1]), r[2]) for r in cur.fetchall()]


def seconds_to_midnight() -> float:
    now = datetime.now(UTC)
    return (now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1) - now).total_seconds()


async def test_fifty_concurrent_calls_against_a_budget_that_admits_ten(
    limited: App, chat: ChatServiceAsyncStub, db: psycopg.Connection[Any]
) -> None:
    user = new_user()
    each = reservation_micros(100)
    budget = 10 * each + each // 2
    await set_limit(limited, db, user, "spend_per_day", budget)

    results = await asyncio.gather(*(complete(chat, request(user)) for _ in range(50)))

    admitted = [r for r in results if isinstance(r, list)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(admitted) == 10 and len(refused) == 40
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        reason, retry, violations = quota(error)
        assert reason == "SPEND_PER_DAY_EXCEEDED"
        assert violations and violations[0][0] == f"user:{TENANT}/{user}"
        assert str(budget) in violations[0][1]
        # The next UTC midnight, stated as at most an hour (errors.MAX_RETRY_DELAY_S).
        assert retry is not None and abs(retry - min(seconds_to_midnight(), 3600)) < 60
    recorded = await rows(limited, db, user)
    assert sorted(r[0] for r in recorded) == ["completed"] * 10 + ["rejected"] * 40
    spent = sum(r[2] or 0 for r in recorded)
    # Each call's real cost is at most its reservation (its input estimated, its output
    # capped): the budget holds with no overshoot at all here.
    assert 0 < spent <= budget


async def test_first_event_carries_allowances_and_the_cap_goes_upstream(
    limited: App, chat: ChatServiceAsyncStub, slow_simulator: Simulator, db: psycopg.Connection[Any]
) -> None:
    user = new_user()
    await set_limit(limited, db, user, "tokens_per_day", 100_000)

    events = await complete(chat, request(user, max_tokens=None))

    assert isinstance(events, list)
    started = events[0].started
    (allowance,) = started.allowances
    assert allowance.subject == f"user:{TENANT}/{user}"
    assert allowance.kind == pb.LIMIT_KIND_TOKENS_PER_DAY
    assert allowance.limit == 100_000
    # The call's reservation is taken: its estimated input plus the configured cap.
    assert allowance.remaining == 100_000 - reservation_tokens(4096)
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    assert allowance.resets_at.ToDatetime(tzinfo=UTC) == midnight
    # No max_completion_tokens from the caller: the cap was sent upstream.
    assert slow_simulator.requests[-1].body["max_completion_tokens"] == 4096


async def test_cancelled_and_failed_calls_settle_to_what_they_used(
    limited: App, chat: ChatServiceAsyncStub, db: psycopg.Connection[Any]
) -> None:
    user = new_user()
    budget = 50_000
    await set_limit(limited, db, user, "tokens_per_day", budget)
    # Cancelled after its second event: a long slow stream.
    call = chat.Complete(
        request(user, model="gpt-4o-mini::chunks=200,delay_ms=20", max_tokens=1000), timeout=30
    )
    for _ in range(2):
        await call.read()
    call.cancel()
    # Failed: the upstream answers 500 (one attempt).
    failed = await complete(chat, request(user, model="gpt-4o-mini::status=500", max_tokens=1000))
    assert isinstance(failed, grpc.aio.AioRpcError)
    await asyncio.sleep(0.2)  # the cancelled call's finally runs
    recorded = await rows(limited, db, user)
    assert [r[0] for r in recorded] == ["cancelled", "upstream_error"]
    used = sum(r[1] for r in recorded)
    assert used > 0  # the cancelled call's input and the output relayed

    events = await complete(chat, request(user, max_tokens=100))

    assert isinstance(events, list)
    (allowance,) = events[0].started.allowances
    # Settled to what the rows say, not to what the two calls reserved (2 × ~1000).
    assert allowance.remaining == budget - used - reservation_tokens(100)


async def test_rate_limit_refuses_with_retry_after_the_refill(
    limited: App, chat: ChatServiceAsyncStub, db: psycopg.Connection[Any]
) -> None:
    user = new_user()
    await set_limit(limited, db, user, "requests_per_minute", 5)

    results = [await complete(chat, request(user, model="gpt-4o-mini::chunks=1")) for _ in range(7)]

    assert [isinstance(r, list) for r in results] == [True] * 5 + [False] * 2
    error = results[-1]
    assert isinstance(error, grpc.aio.AioRpcError)
    reason, retry, violations = quota(error)
    assert reason == "REQUESTS_PER_MINUTE_EXCEEDED"
    # One request refills in 60 / 5 = 12 s.
    assert retry is not None and 5 < retry <= 12.5
    assert violations == [
        (f"user:{TENANT}/{user}", "limit of 5 requests per minute reached (this call needs 1)")
    ]


async def test_concurrent_streams_free_their_slot_when_they_end(
    limited: App, chat: ChatServiceAsyncStub, db: psycopg.Connection[Any]
) -> None:
    user = new_user()
    await set_limit(limited, db, user, "concurrent_streams", 2)
    slow = request(user, model="gpt-4o-mini::chunks=20,delay_ms=50")
    first, second = chat.Complete(slow, timeout=30), chat.Complete(slow, timeout=30)
    await first.read()
    await second.read()

    third = await complete(chat, request(user))

    assert isinstance(third, grpc.aio.AioRpcError)
    reason, retry, _ = quota(third)
    assert reason == "CONCURRENT_STREAMS_EXCEEDED" and retry == 1.0
    first.cancel()
    await asyncio.sleep(0.2)
    assert isinstance(await complete(chat, request(user)), list)
    second.cancel()


async def test_spend_limit_refuses_a_model_without_a_price(
    limited: App, chat: ChatServiceAsyncStub, db: psycopg.Connection[Any]
) -> None:
    user = new_user()
    await set_limit(limited, db, user, "spend_per_month", 5_000_000)

    # The scenario suffix makes a model name the price table does not know.
    error = await complete(chat, request(user, model="gpt-4o-mini::chunks=1"))

    assert isinstance(error, grpc.aio.AioRpcError)
    reason, retry, violations = quota(error)
    assert reason == "SPEND_PER_MONTH_EXCEEDED" and retry is None
    assert "no price" in violations[0][1]
    # A priced model is admitted under the same limit.
    assert isinstance(await complete(chat, request(user)), list)
