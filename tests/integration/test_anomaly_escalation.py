"""The abuse detector acting on a real server: a user's spike is tightened, then — found
again — blocked, and the user's next call is refused (PERMISSION_DENIED, BLOCKED) while
another user passes; the finding, the detector's limits and the block audit are in
Postgres, and invalid calls refused at the edge reach the refusal counts."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import psycopg
import pytest

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.app import App
from chatgate_server.limits.anomaly_settings import DetectorSettings
from chatgate_server.simulator import Simulator
from tests.databases import throwaway_database
from tests.integration.conftest import make_settings
from tests.integration.test_blocks import outcome, run_cli
from tests.integration.test_tracing import Captured

DETECTOR = DetectorSettings(
    interval_s=0.2,
    cooldown_s=0,  # found again at the next run: the ladder's steps follow in a second
    token_floor=200,
    spend_floor_micros=10**12,  # only tokens
    flush_s=0.2,
)


@pytest.fixture
def url() -> Iterator[str]:
    """A database of its own: the detector here acts on every user it finds."""
    admin = os.environ.get("DATABASE_URL")
    if not admin:
        pytest.fail("DATABASE_URL is not set: run the tests with the README's test command")
    with throwaway_database(admin, "chatgate_escalation", migrate=True) as database:
        yield database


@pytest.fixture
def captured() -> Captured:
    return Captured()


@pytest.fixture
async def app(url: str, simulator: Simulator, captured: Captured) -> AsyncIterator[App]:
    application = App(make_settings(url, simulator.base_url, anomaly=DETECTOR), telemetry=captured.telemetry)
    await application.start()
    try:
        yield application
    finally:
        await application.stop(0)


def rows(url: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query).fetchall()


async def test_a_spike_is_tightened_then_blocked_and_the_next_call_refused(
    app: App, url: str, captured: Captured
) -> None:
    said = await run_cli(url, "anomalies", "policy", "default", "--escalate", "block", "--block-for", "2h")
    assert "escalate up to block" in said
    here = f"127.0.0.1:{app.port}"
    # A long prompt, so that a few calls pass the floor of 200 tokens in the hour.
    text = "tell me everything about the history of the world " * 20
    async with grpc.aio.insecure_channel(here) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        for _ in range(3):
            request = pb.CompleteRequest(
                model="gpt-4o-mini::chunks=3",
                user_id="u-spiky",
                messages=[pb.Message(role=pb.ROLE_USER, text=text)],
            )
            events = [e async for e in stub.Complete(request, timeout=10)]
            assert events[-1].finished.outcome == pb.OUTCOME_COMPLETED

    deadline = time.monotonic() + 15
    got = ("OK", "", "")
    while time.monotonic() < deadline:
        got = await outcome(here, "u-spiky")
        if got[0] != "OK":
            break
        await asyncio.sleep(0.2)
    status, reason, message = got
    assert (status, reason) == ("PERMISSION_DENIED", "BLOCKED"), got
    assert message.startswith("user default/u-spiky is blocked until 20")
    assert "abuse detector: usage_spike" in message
    assert (await outcome(here, "u-calm"))[0] == "OK"

    found = rows(url, "SELECT subject, rule, action FROM anomalies WHERE tenant = 'default' ORDER BY id")
    assert found[:2] == [("u-spiky", "usage_spike", "tighten"), ("u-spiky", "usage_spike", "block")]
    assert ("u-calm", "usage_spike", "flag") not in found  # below the floor
    limits = rows(url, "SELECT subject, kind, source FROM limits WHERE tenant = 'default' ORDER BY kind")
    assert ("u-spiky", "tokens_per_day", "detector") in limits
    audit = rows(url, "SELECT action, scope, subject, source, actor FROM block_audit")
    assert audit == [("block", "user", "u-spiky", "detector", "detector")]
    listing = await run_cli(url, "usage", "anomalies", "--tenant", "default")
    assert "user default/u-spiky" in listing and "block until" in listing
    counted = {
        (p.attributes["chatgate.anomaly.rule"], p.attributes["chatgate.anomaly.action"]): p.value
        for p in captured.metric_points("chatgate.anomalies")
    }
    assert counted == {("usage_spike", "tighten"): 1, ("usage_spike", "block"): 1}


async def test_invalid_calls_refused_at_the_edge_are_counted_for_the_detector(app: App, url: str) -> None:
    here = f"127.0.0.1:{app.port}"
    async with grpc.aio.insecure_channel(here) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        for _ in range(5):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stub.Complete(pb.CompleteRequest(model="", user_id="u-1"), timeout=10):
                    pass
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    deadline = time.monotonic() + 10
    counted: list[tuple[Any, ...]] = []
    while time.monotonic() < deadline and sum(c[3] for c in counted) < 5:
        await asyncio.sleep(0.2)
        counted = rows(url, "SELECT tenant, caller, reason, sum(calls) FROM refusal_counts GROUP BY 1, 2, 3")
    assert counted == [("default", "unknown", "INVALID_REQUEST", 5)]
