"""Several deployments behind one chatgate: failover, breakers, weights, keys, the deadline.

Each deployment is its own simulator (or a recording server where the test must see
the key or the URL). A deployment's model map carries the simulator scenario, so one
caller-facing model can fail on one deployment and succeed on another.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc, usage_pb2, usage_pb2_grpc
from chatgate_server.app import App, StartupError
from chatgate_server.simulator import Simulator
from chatgate_server.telemetry import NO_TELEMETRY, Telemetry
from tests.integration.conftest import TEST_API_KEY, make_settings
from tests.integration.recording_upstream import RecordingUpstream
from tests.integration.test_faults import FAST_RETRIES, call
from tests.integration.test_tracing import Captured

Sims = Callable[[int], Awaitable[list[Simulator]]]


@pytest.fixture
async def sims() -> AsyncIterator[Sims]:
    started: list[Simulator] = []

    async def start(n: int) -> list[Simulator]:
        for _ in range(n):
            sim = Simulator()
            await sim.start(host="127.0.0.1", port=0)
            started.append(sim)
        return started[-n:]

    try:
        yield start
    finally:
        for sim in started:
            await sim.stop()


def key_file(value: str) -> str:
    path = Path(tempfile.mkdtemp(prefix="chatgate-key-")) / "key"
    path.write_text(value + "\n")
    return str(path)


def deployment(name: str, base_url: str, models: dict[str, str], **extra: Any) -> str:
    lines = [
        "[[deployments]]",
        f'name = "{name}"',
        f'kind = "{extra.pop("kind", "openai")}"',
        f'{"resource" if "api_version" in extra else "base_url"} = "{base_url}"',
        *(
            []
            if extra.get("key_file", "") is None
            else [f'key_file = "{extra.get("key_file") or key_file(TEST_API_KEY)}"']
        ),
        "models = { " + ", ".join(f'"{m}" = "{u}"' for m, u in models.items()) + " }",
    ]
    extra.pop("key_file", None)
    lines += [f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def route(name: str, *deployments: str, strategy: str = "ordered") -> str:
    listed = ", ".join(f'"{d}"' for d in deployments)
    return (
        f'[[routes]]\nname = "{name}"\nmodel = "{name}"\ndeployments = [{listed}]\nstrategy = "{strategy}"\n'
    )


StartRouted = Callable[..., Awaitable[tuple[App, Any]]]


@pytest.fixture
async def start_routed(migrated_database_url: str) -> AsyncIterator[StartRouted]:
    """chatgate with a chatgate.toml made of ``parts``; returns the app and a stub."""
    running: list[tuple[App, grpc.aio.Channel]] = []

    async def start(*parts: str, telemetry: Telemetry = NO_TELEMETRY, **overrides: Any) -> tuple[App, Any]:
        path = Path(tempfile.mkdtemp(prefix="chatgate-config-")) / "chatgate.toml"
        path.write_text("\n".join(parts))
        settings = make_settings(
            migrated_database_url, "http://127.0.0.1:9/v1", config_file=path, **{**FAST_RETRIES, **overrides}
        )
        app = App(settings, telemetry=telemetry)
        await app.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        running.append((app, channel))
        return app, chat_pb2_grpc.ChatServiceStub(channel)

    try:
        yield start
    finally:
        for app, channel in running:
            await channel.close()
            await app.stop(0)


M = "gpt-4o-mini"


async def test_a_5xx_moves_the_call_to_the_next_deployment(sims: Sims, start_routed: StartRouted) -> None:
    a, b = await sims(2)
    _, stub = await start_routed(
        deployment("a", a.base_url, {"m": f"{M}::status=503"}),
        deployment("b", b.base_url, {"m": M}),
        route("m", "a", "b"),
    )
    result = await call(stub, "m")
    assert result.code == grpc.StatusCode.OK and result.text
    assert (len(a.requests), len(b.requests)) == (1, 1)
    sent = [s.requests[0].headers["x-client-request-id"] for s in (a, b)]
    assert sent[0] == sent[1]  # the same call, moved on


async def test_a_429_moves_on_at_once_without_waiting_its_retry_after(
    sims: Sims, start_routed: StartRouted
) -> None:
    a, b = await sims(2)
    _, stub = await start_routed(
        deployment("a", a.base_url, {"m": f"{M}::rate_limit,retry_after_ms=5000"}),
        deployment("b", b.base_url, {"m": M}),
        route("m", "a", "b"),
    )
    result = await call(stub, "m")
    assert result.code == grpc.StatusCode.OK
    assert result.elapsed < 3.0  # not the 5 s the first deployment asked for
    assert (len(a.requests), len(b.requests)) == (1, 1)


async def test_an_open_breaker_sends_calls_straight_to_the_next_deployment(
    sims: Sims, start_routed: StartRouted
) -> None:
    a, b = await sims(2)
    _, stub = await start_routed(
        deployment("a", a.base_url, {"m": f"{M}::status=500"}),
        deployment("b", b.base_url, {"m": M}),
        route("m", "a", "b"),
        breaker_failure_threshold=1,
        breaker_cooldown_s=30,
    )
    assert (await call(stub, "m")).code == grpc.StatusCode.OK  # a fails (its breaker opens), b serves
    for _ in range(3):
        assert (await call(stub, "m")).code == grpc.StatusCode.OK
    assert (len(a.requests), len(b.requests)) == (1, 4)


async def test_every_breaker_open_is_unavailable_with_the_earliest_reopen(
    sims: Sims, start_routed: StartRouted
) -> None:
    a, b = await sims(2)
    _, stub = await start_routed(
        deployment("a", a.base_url, {"m": f"{M}::status=500"}),
        deployment("b", b.base_url, {"m": f"{M}::status=500"}),
        route("m", "a", "b"),
        breaker_failure_threshold=1,
        breaker_cooldown_s=20,
        retry_max_attempts=2,
    )
    assert (await call(stub, "m")).reason == "UPSTREAM_UNAVAILABLE"
    refused = await call(stub, "m")
    assert refused.code == grpc.StatusCode.UNAVAILABLE and refused.reason == "UPSTREAM_CIRCUIT_OPEN"
    assert refused.retry_after is not None and 15 < refused.retry_after <= 20
    assert (len(a.requests), len(b.requests)) == (1, 1)


async def test_no_failover_after_the_first_event(sims: Sims, start_routed: StartRouted) -> None:
    a, b = await sims(2)
    _, stub = await start_routed(
        deployment("a", a.base_url, {"m": f"{M}::chunks=6,disconnect_after=2"}),
        deployment("b", b.base_url, {"m": M}),
        route("m", "a", "b"),
    )
    result = await call(stub, "m")
    assert result.code == grpc.StatusCode.UNAVAILABLE
    assert result.text  # the caller got content from a: never replayed elsewhere
    assert len(b.requests) == 0


async def test_one_budget_bounds_retries_and_failovers_over_three_deployments(
    sims: Sims, start_routed: StartRouted
) -> None:
    a, b, c = await sims(3)
    parts = (
        deployment("a", a.base_url, {"m": f"{M}::status=500"}),
        deployment("b", b.base_url, {"m": f"{M}::status=502"}),
        deployment("c", c.base_url, {"m": M}),
        route("m", "a", "b", "c"),
    )
    _, stub = await start_routed(*parts, retry_max_attempts=3)
    assert (await call(stub, "m")).code == grpc.StatusCode.OK
    assert [len(s.requests) for s in (a, b, c)] == [1, 1, 1]

    _, stub = await start_routed(*parts, retry_max_attempts=2)
    assert (await call(stub, "m")).code == grpc.StatusCode.UNAVAILABLE  # c is never reached
    assert [len(s.requests) for s in (a, b, c)] == [2, 2, 1]


async def test_the_deadline_bounds_the_whole_chain(sims: Sims, start_routed: StartRouted) -> None:
    a, b = await sims(2)
    _, stub = await start_routed(
        deployment("a", a.base_url, {"m": f"{M}::hang"}),
        deployment("b", b.base_url, {"m": f"{M}::hang"}),
        route("m", "a", "b"),
        retry_max_attempts=20,
        upstream_first_byte_timeout_s=0.3,
        deadline_cap_s=1.0,
    )
    result = await call(stub, "m")
    assert result.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert result.elapsed < 2.0
    assert len(a.requests) >= 1 and len(b.requests) >= 1


async def test_weights_share_the_calls(sims: Sims, start_routed: StartRouted) -> None:
    a, b = await sims(2)
    _, stub = await start_routed(
        deployment("a", a.base_url, {"m": f"{M}::chunks=1"}, weight=3),
        deployment("b", b.base_url, {"m": f"{M}::chunks=1"}, weight=1),
        route("m", "a", "b", strategy="weighted"),
    )
    results = await asyncio.gather(*(call(stub, "m") for _ in range(200)))
    assert all(r.code == grpc.StatusCode.OK for r in results)
    share = len(a.requests) / 200
    assert 0.62 <= share <= 0.88, share  # 0.75 expected; 200 draws stay within ±0.13 but 1 in 10^4


async def test_each_deployment_gets_its_own_key_and_azure_its_url_and_header(
    start_routed: StartRouted, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    servers = [RecordingUpstream() for _ in range(2)]
    for server in servers:
        await server.start()
    openai, azure = servers
    try:
        _, stub = await start_routed(
            deployment("openai", f"{openai.root_url}/v1", {"m": M}, key_file=key_file("sk-openai-ONE")),
            deployment(
                "azure",
                azure.root_url,
                {"m": "my-mini"},
                kind="azure",
                api_version="2024-10-21",
                key_file=key_file("azure-key-TWO"),
            ),
            route("m", "openai", "azure"),
            '[[routes]]\nname = "az"\nmodel = "m"\ndeployments = ["azure"]\n',
        )
        assert (await call(stub, "m")).code == grpc.StatusCode.OK
        assert (await call(stub, "az")).code == grpc.StatusCode.OK
    finally:
        for server in servers:
            await server.stop()
    [to_openai] = openai.seen
    assert to_openai.target == "/v1/chat/completions"
    assert to_openai.headers["authorization"] == "Bearer sk-openai-ONE" and "api-key" not in to_openai.headers
    [to_azure] = azure.seen
    assert to_azure.target == "/openai/deployments/my-mini/chat/completions?api-version=2024-10-21"
    assert to_azure.headers["api-key"] == "azure-key-TWO" and "authorization" not in to_azure.headers
    assert "sk-openai-ONE" not in caplog.text and "azure-key-TWO" not in caplog.text
    assert "(openai " in caplog.text  # the start-up line names the deployments, not their keys


async def test_a_bad_config_file_stops_start_up_with_one_line(migrated_database_url: str) -> None:
    path = Path(tempfile.mkdtemp(prefix="chatgate-config-")) / "chatgate.toml"
    path.write_text('[[deployments]]\nname = "a"\nkind = "openai"\nkey_file = "/nonexistent/key"\n')
    settings = make_settings(migrated_database_url, "http://127.0.0.1:9/v1", config_file=path)
    app = App(settings, telemetry=NO_TELEMETRY)
    with pytest.raises(StartupError) as refused:
        await app.start()
    message = str(refused.value)
    assert "\n" not in message
    assert str(path) in message and "deployments[0] (a).key_file" in message


async def test_the_final_event_the_row_and_the_report_name_the_deployment(
    sims: Sims,
    start_routed: StartRouted,
    db: psycopg.Connection[tuple[object, ...]],
    migrated_database_url: str,
) -> None:
    a, b = await sims(2)
    app, stub = await start_routed(
        deployment("east", a.base_url, {"m": f"{M}::status=500", "solo": M}),
        deployment("west", b.base_url, {"m": M}),
        route("m", "east", "west"),
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    user = f"u-{uuid.uuid4().hex[:8]}"
    finals = []
    for model in ("m", "m", "solo"):
        request = pb.CompleteRequest(
            model=model, user_id=user, messages=[pb.Message(role=pb.ROLE_USER, text="hi")]
        )
        events = [e async for e in stub.Complete(request, timeout=10)]
        finals.append(events[-1].finished.deployment)
    assert finals == ["west", "west", "east"]

    def rows() -> list[tuple[object, ...]]:
        return db.execute(
            "SELECT requested_model, deployment, attempts FROM usage_records"
            " WHERE user_id = %s ORDER BY started_at",
            [user],
        ).fetchall()

    for _ in range(100):
        if len(rows()) == 3:
            break
        await asyncio.sleep(0.05)
    assert rows() == [("m", "west", 2), ("m", "west", 2), ("solo", "east", 1)]

    command = ["usage", "--since", "1h", "--user", user, "--by", "deployment", "--format", "csv"]
    report = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "chatgate_server", *command],
        env={**os.environ, "DATABASE_URL": migrated_database_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert report.returncode == 0, report.stderr
    got = {row["deployment"]: int(row["requests"]) for row in csv.DictReader(io.StringIO(report.stdout))}
    assert got == {"west": 2, "east": 1}

    usage = usage_pb2_grpc.UsageServiceStub(channel)
    since = Timestamp()
    since.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
    reply = await usage.GetUsage(
        usage_pb2.GetUsageRequest(
            start_time=since, user_ids=[user], group_by=[usage_pb2.USAGE_DIMENSION_DEPLOYMENT]
        )
    )
    assert {g.deployment: g.totals.requests for g in reply.groups} == {"west": 2, "east": 1}
    await channel.close()


async def test_spans_and_metrics_name_each_attempts_deployment(sims: Sims, start_routed: StartRouted) -> None:
    a, b = await sims(2)
    captured = Captured()
    _, stub = await start_routed(
        deployment("east", a.base_url, {"m": f"{M}::status=500"}),
        deployment("west", b.base_url, {"m": M}),
        route("m", "east", "west"),
        telemetry=captured.telemetry,
    )
    assert (await call(stub, "m")).code == grpc.StatusCode.OK
    first, second = captured.attempt_spans()
    assert [(s.attributes or {}).get("chatgate.deployment") for s in (first, second)] == ["east", "west"]
    assert (second.attributes or {})["server.address"] == "127.0.0.1"
    assert (second.attributes or {})["server.port"] == b.port
    assert (captured.server_span().attributes or {})["chatgate.deployment"] == "west"
    durations = captured.metric_points("gen_ai.client.operation.duration")
    assert {p.attributes.get("chatgate.deployment") for p in durations} == {"east", "west"}
    states = captured.metric_points("chatgate.breaker.state")
    assert {p.attributes["chatgate.deployment"] for p in states} == {"east", "west"}


async def test_azure_v1_form_and_a_compatible_server_without_a_key(start_routed: StartRouted) -> None:
    servers = [RecordingUpstream() for _ in range(2)]
    for server in servers:
        await server.start()
    azure, local = servers
    try:
        _, stub = await start_routed(
            deployment("azure", azure.root_url, {"m": "gpt-4o-mini"}, kind="azure", api_version="v1"),
            deployment("local", f"{local.root_url}/v1", {"l": "llama"}, kind="compatible", key_file=None),
        )
        assert (await call(stub, "m")).code == grpc.StatusCode.OK
        assert (await call(stub, "l")).code == grpc.StatusCode.OK
    finally:
        for server in servers:
            await server.stop()
    [to_azure] = azure.seen
    assert to_azure.target == "/openai/v1/chat/completions" and to_azure.body["model"] == "gpt-4o-mini"
    assert to_azure.headers["api-key"] == TEST_API_KEY
    [to_local] = local.seen
    assert to_local.target == "/v1/chat/completions" and to_local.body["model"] == "llama"
    assert "authorization" not in to_local.headers and "api-key" not in to_local.headers


async def test_calls_steer_away_from_a_deployment_as_its_headroom_falls(start_routed: StartRouted) -> None:
    servers = [RecordingUpstream() for _ in range(2)]
    for server in servers:
        await server.start()
    a, b = servers
    try:
        _, stub = await start_routed(
            deployment("a", f"{a.root_url}/v1", {"m": M}),
            deployment("b", f"{b.root_url}/v1", {"m": M}),
            route("m", "a", "b"),
        )
        a.headers = {"x-ratelimit-limit-requests": "100", "x-ratelimit-remaining-requests": "50"}
        for _ in range(3):
            assert (await call(stub, "m")).code == grpc.StatusCode.OK
        assert (len(a.seen), len(b.seen)) == (3, 0)  # half left: a stays first
        a.headers = {"x-ratelimit-limit-requests": "100", "x-ratelimit-remaining-requests": "2"}
        assert (await call(stub, "m")).code == grpc.StatusCode.OK  # a answers, and says it is nearly out
        for _ in range(3):
            assert (await call(stub, "m")).code == grpc.StatusCode.OK
        assert (len(a.seen), len(b.seen)) == (4, 3)  # steered to b before a ever said 429
    finally:
        for server in servers:
            await server.stop()


async def test_a_429_cools_its_deployment_down(sims: Sims, start_routed: StartRouted) -> None:
    a, b = await sims(2)
    _, stub = await start_routed(
        deployment("a", a.base_url, {"m": f"{M}::rate_limit,retry_after_ms=3000"}),
        deployment("b", b.base_url, {"m": M}),
        route("m", "a", "b"),
    )
    for _ in range(4):
        assert (await call(stub, "m")).code == grpc.StatusCode.OK
    assert (len(a.requests), len(b.requests)) == (1, 4)  # a is left alone while it cools down


async def test_a_reload_under_load_moves_new_calls_and_lets_running_streams_finish(
    sims: Sims, start_routed: StartRouted
) -> None:
    a, b = await sims(2)
    slow = f"{M}::chunks=20,delay_ms=40"
    app, stub = await start_routed(deployment("a", a.base_url, {"m": slow}), route("m", "a"))
    running = [asyncio.ensure_future(call(stub, "m")) for _ in range(40)]
    await a.wait_requests(40)
    arriving = [asyncio.ensure_future(call(stub, "m")) for _ in range(20)]  # while it reloads
    path = app.settings.config_file
    assert path is not None
    path.write_text(deployment("b", b.base_url, {"m": M}) + route("m", "b"))
    assert await app.reload()
    after = await asyncio.gather(*(call(stub, "m") for _ in range(10)))
    assert all(r.code == grpc.StatusCode.OK and r.events[-1].finished.deployment == "b" for r in after)
    finished = await asyncio.gather(*running, *arriving)
    assert [r.code for r in finished] == [grpc.StatusCode.OK] * 60  # no stream failed
    assert all(r.events[-1].finished.deployment == "a" for r in finished[:40])  # started on a: ended there
    assert len(a.requests) + len(b.requests) == 70
    for _ in range(50):  # a's connections are closed once its last call ended
        if app.retiring_deployments == 0:
            break
        await asyncio.sleep(0.1)
    assert app.retiring_deployments == 0 and a.open_streams == 0
    assert app.router is not None and [d.name for d in app.router.deployments] == ["b"]


async def test_a_bad_file_on_reload_is_refused_and_the_old_one_kept(
    sims: Sims, start_routed: StartRouted, caplog: pytest.LogCaptureFixture
) -> None:
    [a] = await sims(1)
    app, stub = await start_routed(deployment("a", a.base_url, {"m": M}), route("m", "a"))
    breaker = app.router.deployments[0].breaker if app.router else None
    path = app.settings.config_file
    assert path is not None
    path.write_text(deployment("a", a.base_url, {"m": M}) + route("m", "a", "nowhere"))
    assert not await app.reload()
    [line] = [r.getMessage() for r in caplog.records if "reload refused" in r.getMessage()]
    assert "routes[0].deployments: no deployment is named 'nowhere'" in line
    assert (await call(stub, "m")).code == grpc.StatusCode.OK
    # An unchanged deployment survives a good reload as it was (pool, breaker, headroom).
    path.write_text(
        deployment("a", a.base_url, {"m": M})
        + route("m", "a")
        + '[[routes]]\nname = "alias"\nmodel = "m"\ndeployments = ["a"]\n'
    )
    assert await app.reload()
    assert app.router is not None and app.router.deployments[0].breaker is breaker


async def test_sighup_reloads_every_worker(sims: Sims, migrated_database_url: str) -> None:
    from tests.integration.test_workers import complete, free_port, start, stop, wait_serving

    a, b = await sims(2)
    path = Path(tempfile.mkdtemp(prefix="chatgate-config-")) / "chatgate.toml"
    path.write_text(deployment("a", a.base_url, {"*": "*"}))
    port = free_port()
    os.environ["CHATGATE_CONFIG"] = str(path)  # start() passes os.environ on
    try:
        proc = start(migrated_database_url, "http://127.0.0.1:9/v1", port, "--workers", "2")
    finally:
        del os.environ["CHATGATE_CONFIG"]
    target = f"127.0.0.1:{port}"
    try:
        await asyncio.to_thread(wait_serving, proc, target, 2)
        assert await asyncio.to_thread(complete, target, 4) == ["OUTCOME_COMPLETED"] * 4
        assert (len(a.requests), len(b.requests)) == (4, 0)
        path.write_text(deployment("b", b.base_url, {"*": "*"}))
        proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            if len(a.requests) == 4 and len(b.requests) >= 8:
                break
            assert await asyncio.to_thread(complete, target, 2) == ["OUTCOME_COMPLETED"] * 2
        seen_a = len(a.requests)
        assert await asyncio.to_thread(complete, target, 6) == ["OUTCOME_COMPLETED"] * 6
        assert len(a.requests) == seen_a  # every worker reloaded: nothing goes to a any more
        assert proc.poll() is None  # a reload is not a stop
    finally:
        await asyncio.to_thread(stop, proc)


async def test_a_deployment_with_its_own_prices_bills_its_calls_by_them(
    sims: Sims, start_routed: StartRouted, db: psycopg.Connection[tuple[object, ...]]
) -> None:
    a, b = await sims(2)
    free = Path(tempfile.mkdtemp(prefix="chatgate-prices-")) / "self-hosted.csv"
    free.write_text("model,input,cached_input,output,valid_from\ngpt-4o-mini,0,,0,2020-01-01\n")
    _, stub = await start_routed(
        deployment("paid", a.base_url, {"paid": M}),
        deployment("free", b.base_url, {"free": M}, prices_file=str(free)),
    )
    user = f"u-{uuid.uuid4().hex[:8]}"
    costs = {}
    for model in ("paid", "free"):
        hi = [pb.Message(role=pb.ROLE_USER, text="hello there")]
        events = [e async for e in stub.Complete(pb.CompleteRequest(model=model, user_id=user, messages=hi))]
        costs[model] = events[-1].finished.cost.usd_micros
    assert costs["paid"] > 0 and costs["free"] == 0
    for _ in range(100):
        query = "SELECT deployment, cost_usd_micros FROM usage_records WHERE user_id = %s"
        rows: dict[object, object] = {r[0]: r[1] for r in db.execute(query, [user]).fetchall()}
        if len(rows) == 2:
            break
        await asyncio.sleep(0.05)
    assert rows == {"paid": costs["paid"], "free": 0}
