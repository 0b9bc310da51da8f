"""Several deployments behind one chatgate: failover, breakers, weights, keys, the deadline.

Each deployment is its own simulator, OpenAI or Azure flavor; each simulator records
the path, api-version and key (by name) it saw, so a test proves a key never crosses
deployments. A recording server stands in only for a compatible server without a key,
which the simulator refuses. A deployment's model map carries the simulator scenario,
so one caller-facing model can fail on one deployment and succeed on another.
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
from chatgate_server.simulator.testing import keys_seen
from chatgate_server.telemetry import NO_TELEMETRY, Telemetry
from tests.integration.conftest import TEST_API_KEY, make_settings
from tests.integration.recording_upstream import RecordingUpstream
from tests.integration.test_faults import FAST_RETRIES, call
from tests.integration.test_tracing import Captured

Sims = Callable[..., Awaitable[list[Simulator]]]


@pytest.fixture
async def sims() -> AsyncIterator[Sims]:
    started: list[Simulator] = []

    async def start(n: int, **options: Any) -> list[Simulator]:
        """``n`` simulators made with ``options`` (e.g. ``flavor="azure"``, ``keys={...}``)."""
        for _ in range(n):
            sim = Simulator(**options)
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
            migrated_database_url,
            "http://127.0.0.1:9/v1",
            config_file=path,
            # Reloads when a test says (app.reload()), unless it tests the file watch.
            **{**FAST_RETRIES, "config_poll_s": 0, **overrides},
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


async def test_a_compatible_server_without_a_key_gets_no_credential_header(start_routed: StartRouted) -> None:
    # A recording server, not the simulator: the simulator refuses a call without a key.
    local = RecordingUpstream()
    await local.start()
    try:
        _, stub = await start_routed(
            deployment("local", f"{local.root_url}/v1", {"l": "llama"}, kind="compatible", key_file=None),
        )
        assert (await call(stub, "l")).code == grpc.StatusCode.OK
    finally:
        await local.stop()
    [to_local] = local.seen
    assert to_local.target == "/v1/chat/completions" and to_local.body["model"] == "llama"
    assert "authorization" not in to_local.headers and "api-key" not in to_local.headers


async def test_calls_steer_away_from_a_deployment_as_its_headroom_falls(
    sims: Sims, start_routed: StartRouted
) -> None:
    openai, azure = await openai_and_azure(sims)
    _, stub = await start_routed(
        openai_part(openai), azure_part(azure, CLASSIC), route("m", "openai", "azure")
    )
    # 100 requests an hour: each call takes one, nothing refills meanwhile.
    openai.set_headroom(limit_requests=100, remaining_requests=50, window_s=3600)
    for _ in range(3):
        assert (await call(stub, "m")).code == grpc.StatusCode.OK
    assert (len(openai.requests), len(azure.requests)) == (3, 0)  # half left: openai stays first
    openai.set_headroom(remaining_requests=4)
    assert (await call(stub, "m")).code == grpc.StatusCode.OK  # answers, and says 3 % is left
    for _ in range(3):
        assert (await call(stub, "m")).code == grpc.StatusCode.OK
    assert (len(openai.requests), len(azure.requests)) == (4, 3)  # steered away before any 429
    assert all(r.status == 200 for r in openai.requests)


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


# --- OpenAI and Azure side by side: the simulator's Azure flavor as a deployment ---------

OPENAI_KEY = "sk-openai-ONE"
AZURE_KEY = "azure-key-TWO"
CLASSIC = "2024-10-21"


async def openai_and_azure(sims: Sims) -> tuple[Simulator, Simulator]:
    """An OpenAI-flavor simulator and an Azure resource with the deployment ``chat``;
    each accepts only its own key, and its records name the key it saw."""
    [openai] = await sims(1, keys={"openai": OPENAI_KEY})
    [azure] = await sims(1, flavor="azure", deployments={"chat": M}, keys={"azure": AZURE_KEY})
    return openai, azure


def openai_part(sim: Simulator, model: str = M, name: str = "openai") -> str:
    return deployment(name, sim.base_url, {"m": model}, key_file=key_file(OPENAI_KEY))


def azure_part(sim: Simulator, api_version: str, azure_name: str = "chat", name: str = "azure") -> str:
    """An Azure deployment of ``sim``: ``m`` is its deployment ``azure_name`` (a scenario
    suffix such as ``chat::status=500`` makes it fail)."""
    return deployment(
        name,
        sim.azure_endpoint,
        {"m": azure_name},
        kind="azure",
        api_version=api_version,
        key_file=key_file(AZURE_KEY),
    )


async def test_openai_and_azure_each_get_their_own_key_url_and_header(
    sims: Sims, start_routed: StartRouted, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    openai, azure = await openai_and_azure(sims)
    _, stub = await start_routed(
        openai_part(openai),
        azure_part(azure, CLASSIC),
        azure_part(azure, "v1", name="azure-v1"),
        route("m", "openai"),
        '[[routes]]\nname = "az"\nmodel = "m"\ndeployments = ["azure"]\n',
        '[[routes]]\nname = "az1"\nmodel = "m"\ndeployments = ["azure-v1"]\n',
    )
    for model, served_by in (("m", "openai"), ("az", "azure"), ("az1", "azure-v1")):
        result = await call(stub, model)
        assert result.code == grpc.StatusCode.OK and result.text, model
        # Azure's opening chunk (prompt filter results, no choices) is not an event.
        assert result.kinds[0] == "started" and result.events[-1].finished.deployment == served_by
        assert result.events[-1].finished.usage.output_tokens > 0
    [to_openai] = openai.requests
    assert (to_openai.path, to_openai.auth_scheme) == ("/v1/chat/completions", "bearer")
    assert [(r.path, r.deployment, r.api_version, r.auth_scheme) for r in azure.requests] == [
        ("/openai/deployments/chat/chat/completions", "chat", CLASSIC, "api-key"),
        ("/openai/v1/chat/completions", "chat", None, "api-key"),
    ]
    assert keys_seen(openai.requests) == {"openai"} and keys_seen(azure.requests) == {"azure"}
    assert OPENAI_KEY not in caplog.text and AZURE_KEY not in caplog.text


@pytest.mark.parametrize("api_version", [CLASSIC, "v1"])
@pytest.mark.parametrize("fault", ["status=500", "rate_limit,retry_after_ms=5000"])
@pytest.mark.parametrize("failing", ["openai", "azure"])
async def test_a_failure_moves_the_call_between_openai_and_azure(
    sims: Sims, start_routed: StartRouted, api_version: str, fault: str, failing: str
) -> None:
    openai, azure = await openai_and_azure(sims)
    order = ("openai", "azure") if failing == "openai" else ("azure", "openai")
    _, stub = await start_routed(
        openai_part(openai, f"{M}::{fault}" if failing == "openai" else M),
        azure_part(azure, api_version, f"chat::{fault}" if failing == "azure" else "chat"),
        route("m", *order),
    )
    result = await call(stub, "m")
    assert result.code == grpc.StatusCode.OK and result.text
    assert result.elapsed < 3.0  # a 429 moves on at once, not after its retry-after
    assert result.events[-1].finished.deployment == order[1]
    assert (len(openai.requests), len(azure.requests)) == (1, 1)
    failed = 500 if fault == "status=500" else 429
    statuses = {"openai": openai.requests[0].status, "azure": azure.requests[0].status}
    assert statuses == {failing: failed, order[1]: 200}
    # The call moved, its key did not: each endpoint saw its own deployment's key only.
    assert keys_seen(openai.requests) == {"openai"} and keys_seen(azure.requests) == {"azure"}


@pytest.mark.parametrize("api_version", [CLASSIC, "v1"])
async def test_an_open_azure_breaker_sends_calls_straight_to_openai(
    sims: Sims, start_routed: StartRouted, api_version: str
) -> None:
    openai, azure = await openai_and_azure(sims)
    _, stub = await start_routed(
        azure_part(azure, api_version, "chat::status=500"),
        openai_part(openai),
        route("m", "azure", "openai"),
        breaker_failure_threshold=1,
        breaker_cooldown_s=30,
    )
    results = [await call(stub, "m") for _ in range(4)]
    assert [r.events[-1].finished.deployment for r in results] == ["openai"] * 4
    assert (len(azure.requests), len(openai.requests)) == (1, 4)  # azure was tried once, then skipped
    assert keys_seen(openai.requests) == {"openai"} and keys_seen(azure.requests) == {"azure"}


async def test_no_failover_from_azure_after_its_first_event(sims: Sims, start_routed: StartRouted) -> None:
    openai, azure = await openai_and_azure(sims)
    _, stub = await start_routed(
        azure_part(azure, CLASSIC, "chat::chunks=6,disconnect_after=2"),
        openai_part(openai),
        route("m", "azure", "openai"),
    )
    result = await call(stub, "m")
    assert result.code == grpc.StatusCode.UNAVAILABLE and result.text
    assert len(openai.requests) == 0


@pytest.mark.parametrize("wrong", ["deployment name", "api_version", "resource path"])
async def test_a_misconfigured_azure_deployment_is_passed_over_and_named_once(
    sims: Sims, start_routed: StartRouted, caplog: pytest.LogCaptureFixture, wrong: str
) -> None:
    openai, azure = await openai_and_azure(sims)
    broken = {
        "deployment name": azure_part(azure, CLASSIC, "no-such-deployment"),  # 404 DeploymentNotFound
        "api_version": azure_part(azure, "2019-01-01"),  # 400 API version not supported
        "resource path": azure_part(azure, CLASSIC).replace(
            azure.azure_endpoint, f"{azure.azure_endpoint}/x"
        ),
    }[wrong]
    _, stub = await start_routed(
        broken, openai_part(openai), route("m", "azure", "openai"), breaker_failure_threshold=2
    )
    results = [await call(stub, "m") for _ in range(4)]
    # Not the caller's mistake: each call is served by the next deployment.
    assert [(r.code, r.events[-1].finished.deployment) for r in results] == [
        (grpc.StatusCode.OK, "openai")
    ] * 4
    # It counts toward the breaker: after two calls, azure is passed over.
    if wrong != "resource path":  # (the simulator keeps no record of a path it does not serve)
        assert len(azure.requests) == 2
    lines = [r.getMessage() for r in caplog.records if "deployment azure is misconfigured" in r.getMessage()]
    named = {
        "deployment name": "DeploymentNotFound",
        "api_version": "API version",
        "resource path": "Resource not",
    }
    assert len(lines) == 1 and named[wrong] in lines[0]
    assert keys_seen(openai.requests) == {"openai"}
    assert AZURE_KEY not in caplog.text and OPENAI_KEY not in caplog.text


async def test_with_no_deployment_left_a_misconfiguration_is_unavailable_not_the_callers_mistake(
    sims: Sims, start_routed: StartRouted
) -> None:
    _, azure = await openai_and_azure(sims)
    _, stub = await start_routed(azure_part(azure, CLASSIC, "no-such-deployment"), route("m", "azure"))
    result = await call(stub, "m")
    assert (result.code, result.reason) == (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_MISCONFIGURED")
    assert "does not exist" not in result.message and "DeploymentNotFound" not in result.details_text
    assert len(azure.requests) == 1  # never retried where it cannot succeed


async def test_a_fallback_that_served_the_call_is_named_in_the_final_event_the_row_and_the_report(
    sims: Sims,
    start_routed: StartRouted,
    db: psycopg.Connection[tuple[object, ...]],
    migrated_database_url: str,
) -> None:
    openai, azure = await openai_and_azure(sims)
    _, stub = await start_routed(
        azure_part(azure, CLASSIC, "chat::status=500"),
        deployment("openai", openai.base_url, {"m": M, "big": "gpt-4o"}, key_file=key_file(OPENAI_KEY)),
        route("m", "azure"),
        '[[routes]]\nname = "fast"\nmodel = "m"\ndeployments = ["azure"]\nfallback = "big"\n',
    )
    user = f"u-{uuid.uuid4().hex[:8]}"
    finals = []
    for model in ("fast", "big"):
        hi = [pb.Message(role=pb.ROLE_USER, text="hi")]
        events = [e async for e in stub.Complete(pb.CompleteRequest(model=model, user_id=user, messages=hi))]
        finals.append(
            (events[0].started.model, events[-1].finished.deployment, events[-1].finished.fallback_model)
        )
    assert finals == [
        ("gpt-4o-2024-08-06", "openai", "big"),  # azure failed: the route fell back, and says so
        ("gpt-4o-2024-08-06", "openai", ""),  # asked for by name: no fallback
    ]

    def rows() -> list[tuple[object, ...]]:
        query = (
            "SELECT requested_model, fallback_model FROM usage_records WHERE user_id = %s ORDER BY started_at"
        )
        return db.execute(query, [user]).fetchall()

    for _ in range(100):
        if len(rows()) == 2:
            break
        await asyncio.sleep(0.05)
    assert rows() == [("fast", "big"), ("big", None)]
    command = ["usage", "--since", "1h", "--user", user, "--by", "model,fallback", "--format", "csv"]
    report = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "chatgate_server", *command],
        env={**os.environ, "DATABASE_URL": migrated_database_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert report.returncode == 0, report.stderr
    got = {
        (row["model"], row["fallback"]): int(row["requests"])
        for row in csv.DictReader(io.StringIO(report.stdout))
    }
    assert got == {("fast", "big"): 1, ("big", ""): 1}


async def test_a_changed_file_reloads_without_a_signal(
    sims: Sims, start_routed: StartRouted, caplog: pytest.LogCaptureFixture
) -> None:
    """The file is mounted as a ConfigMap is: chatgate.toml -> ..data/chatgate.toml, and an
    update swaps ..data to a new directory."""
    a, b = await sims(2)
    first = deployment("a", a.base_url, {"m": M, "slow": f"{M}::chunks=20,delay_ms=40"}) + route("m", "a")
    app, stub = await start_routed(first, config_poll_s=0.05)
    assert app.router is not None and app.settings.config_file is not None
    mount = app.settings.config_file.parent / "mount"
    mount.mkdir()

    def publish(version: str, text: str) -> None:
        (mount / version).mkdir()
        (mount / version / "chatgate.toml").write_text(text)
        (mount / "..data_tmp").symlink_to(version)
        (mount / "..data_tmp").replace(mount / "..data")

    async def served_by(name: str) -> bool:
        for _ in range(100):
            if app.router is not None and [d.name for d in app.router.deployments] == [name]:
                return True
            await asyncio.sleep(0.05)
        return False

    # Start on a file that is a symlink, as in a pod: the app reads it through the link.
    publish("..v1", first)
    (mount / "chatgate.toml").symlink_to("..data/chatgate.toml")
    app.settings.config_file.unlink()
    app.settings.config_file.symlink_to(mount / "chatgate.toml")
    running = asyncio.ensure_future(call(stub, "slow"))
    await a.wait_requests(1)
    publish("..v2", deployment("b", b.base_url, {"m": M}) + route("m", "b"))
    assert await served_by("b")
    assert (await call(stub, "m")).events[-1].finished.deployment == "b"
    finished = await running
    assert finished.code == grpc.StatusCode.OK and finished.events[-1].finished.deployment == "a"

    # A bad file is refused once, and the running configuration kept.
    publish("..v3", deployment("b", b.base_url, {"m": M}) + route("m", "b", "nowhere"))
    for _ in range(100):
        if any("reload refused" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # several more polls
    refused = [r for r in caplog.records if "reload refused" in r.getMessage()]
    assert len(refused) == 1
    assert (await call(stub, "m")).events[-1].finished.deployment == "b"


async def test_each_deployment_has_a_health_name_that_follows_its_breaker(
    sims: Sims, start_routed: StartRouted, migrated_database_url: str
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    openai, azure = await openai_and_azure(sims)
    app, stub = await start_routed(
        azure_part(azure, CLASSIC, "chat::status=500"),
        openai_part(openai),
        route("m", "azure", "openai"),
        breaker_failure_threshold=1,
        breaker_cooldown_s=1.0,
    )
    assert app.deployment_health is not None and app.settings.config_file is not None
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    health = health_pb2_grpc.HealthStub(channel)

    async def statuses() -> dict[str, str]:
        await app.deployment_health.settled()  # type: ignore[union-attr]
        out = {}
        for name in ("azure", "openai"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=f"chatgate.deployment.{name}"))
            out[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return out

    try:
        assert await statuses() == {"azure": "SERVING", "openai": "SERVING"}
        assert (await call(stub, "m")).code == grpc.StatusCode.OK  # azure fails: its breaker opens
        assert await statuses() == {"azure": "NOT_SERVING", "openai": "SERVING"}
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING  # the server itself still serves

        command = [sys.executable, "-m", "chatgate_server", "health", "--deployments"]
        ran = await asyncio.to_thread(
            subprocess.run,
            [*command, "--address", f"127.0.0.1:{app.port}"],
            env={**os.environ, "CHATGATE_CONFIG": str(app.settings.config_file)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ran.returncode == 0, ran.stderr  # informational: the exit status is the server's
        assert ran.stdout.splitlines() == [
            "SERVING",
            "chatgate.deployment.azure: NOT_SERVING",
            "chatgate.deployment.openai: SERVING",
        ]

        for _ in range(60):  # the cool-down ends: half-open, a probe may go there
            if (await statuses())["azure"] == "SERVING":
                break
            await asyncio.sleep(0.1)
        assert (await statuses())["azure"] == "SERVING"

        app.settings.config_file.write_text(openai_part(openai) + route("m", "openai"))
        assert await app.reload()
        assert await statuses() == {"azure": "SERVICE_UNKNOWN", "openai": "SERVING"}  # dropped
    finally:
        await channel.close()


async def test_a_missing_azure_deployment_named_by_the_caller_is_the_callers_mistake(
    sims: Sims, start_routed: StartRouted, caplog: pytest.LogCaptureFixture
) -> None:
    """With a "*" model entry the caller's model name is the Azure deployment name: one
    that does not exist is a model that does not exist, not a broken deployment."""
    _, azure = await openai_and_azure(sims)
    app, stub = await start_routed(
        deployment(
            "azure",
            azure.azure_endpoint,
            {"*": "*"},
            kind="azure",
            api_version=CLASSIC,
            key_file=key_file(AZURE_KEY),
        ),
        breaker_failure_threshold=1,
    )
    for _ in range(2):
        result = await call(stub, "no-such-model")
        assert (result.code, result.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED_REQUEST")
    assert app.router is not None and app.router.deployments[0].breaker.state.name == "CLOSED"
    assert not any("misconfigured" in r.getMessage() for r in caplog.records)
    assert (await call(stub, "chat")).code == grpc.StatusCode.OK  # its real deployment still serves
