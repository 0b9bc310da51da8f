"""A caller's deadline still delivers the stream's ``finished`` event (issue 13, item 6).

The proto promises ``finished`` on every started stream, deadline included. chatgate
used to cut at exactly the caller's deadline, when the caller's own gRPC library ends
the call too: the final event lost that race every time (0 of 21 calls). Now the cut
comes a margin earlier (deadline.py), so each client sees the event, with outcome
deadline_exceeded and usage, and then DEADLINE_EXCEEDED. Checked through the three ways
a caller reaches chatgate: the Python client, the Node client and grpcurl.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import grpc
import pytest

from chatgate.client import AsyncClient, ChatgateError, Client, Outcome, build_request
from chatgate_server.app import App
from chatgate_server.deadline import final_event_margin
from tests.integration.test_node_client import NODE_CLIENT, ensure_node_dependencies, run, tool
from tests.integration.test_readme_recipes import json_objects

# 200 tokens 30 ms apart: still streaming when the caller's deadline comes.
SLOW = "gpt-4o-mini::chunks=200,delay_ms=30"
DEADLINE_S = 1.5


def test_the_margin_is_a_few_percent_with_a_floor_and_a_ceiling() -> None:
    assert final_event_margin(0.2) == pytest.approx(0.05)  # a quarter of a short deadline
    assert final_event_margin(2.0) == pytest.approx(0.25)
    assert final_event_margin(10.0) == pytest.approx(0.5)
    assert final_event_margin(600.0) == pytest.approx(1.0)


async def test_python_client_gets_the_final_event(app: App) -> None:
    async def one(client: AsyncClient) -> ChatgateError:
        with pytest.raises(ChatgateError) as info:
            await client.collect(build_request(SLOW, "hello", user_id="user-1"), timeout=DEADLINE_S)
        return info.value

    async with AsyncClient(f"127.0.0.1:{app.port}") as client:
        errors = await asyncio.gather(*(one(client) for _ in range(5)))
    for error in errors:
        assert error.code is grpc.StatusCode.DEADLINE_EXCEEDED
        partial = error.partial
        assert partial is not None and partial.finished, "the stream ended without its finished event"
        assert partial.outcome is Outcome.DEADLINE_EXCEEDED
        assert partial.usage is not None and partial.usage.output_tokens > 0
        assert partial.usage.input_tokens > 0
        assert partial.cost is not None


NODE_SCRIPT = """
import { ChatgateClient, user } from "@chatgate/client";
const client = new ChatgateClient(process.env.CHATGATE_ADDR);
const request = { model: process.env.MODEL, userId: "node-user", messages: [user("hello")] };
const results = await Promise.all([0, 1, 2].map(async () => {
  try {
    await client.collect(request, { timeoutMs: Number(process.env.TIMEOUT_MS) });
    return { code: 0 };
  } catch (error) {
    const p = error.partial;
    return { code: error.code, finished: p?.finished, outcome: p?.outcome, usage: p?.usage, cost: p?.cost };
  }
}));
client.close();
console.log(JSON.stringify(results));
"""


@pytest.mark.timeout(420)
async def test_node_client_gets_the_final_event(app: App) -> None:
    node = tool("node")
    await ensure_node_dependencies()
    env = {
        **os.environ,
        "CHATGATE_ADDR": f"127.0.0.1:{app.port}",
        "MODEL": SLOW,
        "TIMEOUT_MS": str(int(DEADLINE_S * 1000)),
        "NODE_OPTIONS": "",
    }
    script = ("--input-type=module", "-e", NODE_SCRIPT)
    code, out = await run(node, *script, cwd=NODE_CLIENT, env=env, timeout=60)
    assert code == 0, out
    results = json.loads(out.strip().splitlines()[-1])
    for result in results:
        assert result["code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], result
        assert result["finished"] is True, f"the stream ended without its finished event: {result}"
        assert result["outcome"] == "deadline_exceeded"
        assert result["usage"]["outputTokens"] > 0 and result["usage"]["inputTokens"] > 0
        assert result["cost"] is not None


async def test_grpcurl_gets_the_final_event(app: App) -> None:
    request = json.dumps(
        {"model": SLOW, "user_id": "user-1", "messages": [{"role": "ROLE_USER", "text": "Hello!"}]}
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = await asyncio.create_subprocess_exec(
        "grpcurl",
        "-plaintext",
        "-max-time",
        str(DEADLINE_S),
        "-d",
        request,
        f"127.0.0.1:{app.port}",
        "chatgate.v1.ChatService/Complete",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode != 0
    assert "DeadlineExceeded" in err.decode(), err.decode()
    events = json_objects(out.decode())
    assert "started" in events[0]
    finished = events[-1].get("finished")
    assert finished is not None, f"the stream ended without its finished event: {events[-1]}"
    assert finished["outcome"] == "OUTCOME_DEADLINE_EXCEEDED"
    assert int(finished["usage"]["output_tokens"]) > 0 and int(finished["usage"]["input_tokens"]) > 0
    assert finished["usage"]["source"] == "USAGE_SOURCE_ESTIMATED" and "usd_micros" in finished["cost"]


async def test_a_server_whose_loop_runs_late_still_sends_the_final_event(app: App) -> None:
    """Saturation, simulated: something holds chatgate's event loop 350 ms at a time, so
    the cut at the deadline and the final event's write both run late. The margin grows
    with the loop's recent lag (loop_lag.py), so the event still beats the caller's
    deadline. The callers are sync clients on threads: gRPC's own threads read for them,
    whatever this loop does."""
    stalls = 0

    async def hog() -> None:
        nonlocal stalls
        while True:
            time.sleep(0.35)  # noqa: ASYNC251 - blocking the loop is the point
            stalls += 1
            await asyncio.sleep(0.05)

    def one(client: Client) -> ChatgateError:
        with pytest.raises(ChatgateError) as info:
            client.collect(build_request(SLOW, "hello", user_id="user-lag"), timeout=4.0)
        return info.value

    hogging = asyncio.create_task(hog())
    try:
        await asyncio.sleep(1.0)  # the loop's lag is seen before the calls start
        with Client(f"127.0.0.1:{app.port}") as client:
            errors = await asyncio.gather(*(asyncio.to_thread(one, client) for _ in range(4)))
    finally:
        hogging.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await hogging
    assert stalls > 5
    for error in errors:
        assert error.code is grpc.StatusCode.DEADLINE_EXCEEDED
        partial = error.partial
        assert partial is not None and partial.finished, "the stream ended without its finished event"
        assert partial.outcome is Outcome.DEADLINE_EXCEEDED


def test_the_margin_widens_with_the_loops_lag_within_its_share() -> None:
    assert final_event_margin(4.0, loop_lag=0.2) == pytest.approx(0.25 + 0.4)
    assert final_event_margin(4.0, loop_lag=2.0) == pytest.approx(1.0)  # a quarter of the time left
    assert final_event_margin(600.0, loop_lag=0.5) == pytest.approx(2.0)  # past the 1 s ceiling
