"""Bills through a real chatgate: what each call's usage row says it cost, and why.

Calls go over gRPC to chatgate on a loopback port, on to the simulator, and their rows
are read back from Postgres: refused calls cost nothing and say so, served calls are
priced from the price table (the operator's file over the shipped one, the version in
force recorded), and a model with no price is counted, logged once and never guessed.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.app import App
from chatgate_server.domain import TokenUsage
from chatgate_server.simulator import Simulator
from chatgate_server.telemetry import Telemetry
from chatgate_server.usage.pricing import PRICE_VERSION, cost_of
from tests.integration.conftest import AppFactory

FAST_RETRIES: dict[str, Any] = {"retry_base_s": 0.02, "retry_cap_s": 0.1}
HEADER = "model,input,cached_input,output,valid_from\n"


async def call(app: App, model: str, user_id: str) -> grpc.StatusCode:
    req = pb.CompleteRequest(
        model=model, user_id=user_id, messages=[pb.Message(role=pb.ROLE_USER, text="hello")]
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        try:
            async for _ in stub.Complete(req, timeout=20):
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def rows(app: App, url: str, user_id: str) -> list[dict[str, Any]]:
    assert app.ledger is not None
    await app.ledger.flush()
    with psycopg.connect(url) as conn:
        cur = conn.execute(
            "SELECT outcome, grpc_status, attempts, resolved_model, input_tokens, output_tokens,"
            " cached_input_tokens, usage_source, cost_usd_micros, price_version, cost_basis"
            " FROM usage_records WHERE user_id = %s ORDER BY started_at",
            [user_id],
        )
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def user() -> str:
    return f"bill-{uuid.uuid4().hex[:10]}"


@pytest.mark.parametrize(
    ("scenario", "code", "attempts"),
    [
        ("status=400", grpc.StatusCode.INVALID_ARGUMENT, 1),
        ("status=404", grpc.StatusCode.INVALID_ARGUMENT, 1),  # model not found
        ("status=500", grpc.StatusCode.UNAVAILABLE, 3),  # after its retries
        ("insufficient_quota", grpc.StatusCode.UNAVAILABLE, 1),  # our billing 429
        ("too_large", grpc.StatusCode.INVALID_ARGUMENT, 1),  # request too large 429
        ("rate_limit,retry_after_ms=20", grpc.StatusCode.UNAVAILABLE, 3),
    ],
)
async def test_a_call_the_upstream_refused_costs_nothing_and_says_why(
    start_app: AppFactory, migrated_database_url: str, scenario: str, code: grpc.StatusCode, attempts: int
) -> None:
    app = await start_app(**FAST_RETRIES)
    uid = user()
    assert await call(app, f"gpt-4o-mini::{scenario}", uid) == code
    (row,) = await rows(app, migrated_database_url, uid)
    assert row["attempts"] == attempts and row["resolved_model"] is None
    assert row["outcome"] in ("upstream_error", "rejected")
    assert row["cost_usd_micros"] == 0
    assert row["cost_basis"] == "not_charged"
    assert row["price_version"] == "none"
    # The prompt estimate stays in the row: what the call would have read.
    assert row["usage_source"] == "estimated" and row["input_tokens"] > 0


async def test_calls_refused_by_the_open_breaker_cost_nothing(
    start_app: AppFactory, migrated_database_url: str
) -> None:
    app = await start_app(breaker_failure_threshold=1, breaker_cooldown_s=60, **FAST_RETRIES)
    uid = user()
    assert await call(app, "gpt-4o-mini::status=500,should_retry=false", uid) == grpc.StatusCode.UNAVAILABLE
    assert await call(app, "gpt-4o-mini", uid) == grpc.StatusCode.UNAVAILABLE  # breaker open
    failed, refused = await rows(app, migrated_database_url, uid)
    assert refused["attempts"] == 0 and refused["outcome"] == "rejected"
    for row in (failed, refused):
        assert (row["cost_usd_micros"], row["cost_basis"]) == (0, "not_charged")


async def test_a_served_call_is_priced_from_the_shipped_table(
    start_app: AppFactory, migrated_database_url: str
) -> None:
    app = await start_app()
    uid = user()
    assert await call(app, "gpt-4o-mini", uid) == grpc.StatusCode.OK
    (row,) = await rows(app, migrated_database_url, uid)
    assert row["resolved_model"] == "gpt-4o-mini-2024-07-18"  # a dated snapshot of gpt-4o-mini
    assert row["usage_source"] == "reported" and row["output_tokens"] > 0
    usage = TokenUsage(input_tokens=row["input_tokens"], output_tokens=row["output_tokens"])
    # gpt-4o-mini: $0.15 in, $0.60 out per 1M.
    expected = (row["input_tokens"] * 150_000 + row["output_tokens"] * 600_000 + 500_000) // 1_000_000
    assert row["cost_usd_micros"] == expected == cost_of("gpt-4o-mini", usage).usd_micros
    assert (row["price_version"], row["cost_basis"]) == (PRICE_VERSION, "priced")


async def test_the_operators_file_and_its_newest_version_price_the_call(
    start_app: AppFactory, migrated_database_url: str, tmp_path: Path
) -> None:
    yesterday = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    prices = tmp_path / "prices.csv"
    prices.write_text(
        HEADER
        + "gpt-4o-mini,1.00,,2.00,2020-01-01\n"
        + f"gpt-4o-mini,3.00,,4.00,{yesterday}\n"  # the version in force now
        + f"gpt-4o-mini,99.00,,99.00,{tomorrow}\n"  # not yet
    )
    app = await start_app(prices_file=prices)
    uid = user()
    assert await call(app, "gpt-4o-mini", uid) == grpc.StatusCode.OK
    (row,) = await rows(app, migrated_database_url, uid)
    expected = (row["input_tokens"] * 3_000_000 + row["output_tokens"] * 4_000_000 + 500_000) // 1_000_000
    assert row["cost_usd_micros"] == expected
    assert row["price_version"] == f"operator:{yesterday}"


async def test_a_model_without_a_price_is_unknown_counted_and_logged_once(
    start_app: AppFactory, migrated_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    reader = InMemoryMetricReader()
    # A typo that an upstream accepts (the real API 404s it; a compatible server may
    # not): it used to be priced as gpt-4o. This simulator serves any model name.
    lenient = Simulator(any_model=True)
    await lenient.start()
    try:
        app = await start_app(
            telemetry=Telemetry(meter_provider=MeterProvider(metric_readers=[reader])),
            openai_base_url=lenient.base_url,
        )
        uid = user()
        model = "gpt-4o-minii"
        with caplog.at_level(logging.WARNING, logger="chatgate_server.usage.pricing"):
            for _ in range(3):
                assert await call(app, model, uid) == grpc.StatusCode.OK
    finally:
        await lenient.stop()
    got = await rows(app, migrated_database_url, uid)
    assert [(r["cost_usd_micros"], r["cost_basis"]) for r in got] == [(None, "price_unknown")] * 3
    assert all(r["output_tokens"] > 0 for r in got)  # the usage is kept, only the price is unknown
    warnings = [r.getMessage() for r in caplog.records if model in r.getMessage()]
    assert len(warnings) == 1
    data = reader.get_metrics_data()
    assert data is not None
    points = [
        p
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "chatgate.usage.unpriced"
        for p in m.data.data_points
    ]
    assert [(dict(p.attributes or {}), p.value) for p in points] == [  # type: ignore[union-attr]
        ({"chatgate.priced_model": model}, 3)
    ]
