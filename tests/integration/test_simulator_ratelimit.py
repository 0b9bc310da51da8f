"""The simulator's scriptable headroom (x-ratelimit-* headers, 429 when spent), the
instance scenario and key records, over real sockets in the OpenAI flavor."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from chatgate_server.simulator import Simulator
from chatgate_server.simulator.content import estimate_prompt_tokens
from chatgate_server.simulator.keys import fingerprint

KEY = "sk-test-secret-0123456789"
MESSAGES = [{"role": "user", "content": "Say something."}]
DURATION = re.compile(r"^(?:(\d+)ms|(?:(\d+)h)?(?:(\d+)m)?(\d+(?:\.\d+)?)s)$")
# Long enough that refilling during a test never moves a count (1 request per 100000 s).
FROZEN = 10_000_000.0
RATELIMIT = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
)


def chat(model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "stream": True, **extra}


def seconds(duration: str) -> float:
    """An OpenAI reset duration (``20ms``, ``1.5s``, ``6m0s``, ``27h46m40s``) in seconds."""
    match = DURATION.match(duration)
    assert match, duration
    ms, hours, minutes, secs = match.groups()
    if ms is not None:
        return int(ms) / 1000
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(secs)


def remaining(response: httpx.Response) -> tuple[int, int]:
    return (
        int(response.headers["x-ratelimit-remaining-requests"]),
        int(response.headers["x-ratelimit-remaining-tokens"]),
    )


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator() as simulator:
        yield simulator


@pytest.fixture
async def client(sim: Simulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=sim.base_url, headers={"authorization": f"Bearer {KEY}"}, timeout=5
    ) as http:
        yield http


async def test_every_response_reports_the_budget_and_each_request_spends_it(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    sim.set_headroom(limit_requests=100, limit_tokens=10_000, window_s=FROZEN)
    cost = estimate_prompt_tokens(chat()) + 12  # prompt + the reply's chunks (no max tokens)

    first = await client.post("/chat/completions", json=chat())
    second = await client.post("/chat/completions", json=chat(max_completion_tokens=50))
    failed = await client.post("/chat/completions", json=chat("gpt-4o::status=500"))

    for response in (first, second, failed):
        assert all(name in response.headers for name in RATELIMIT)
    assert first.headers["x-ratelimit-limit-requests"] == "100"
    assert first.headers["x-ratelimit-limit-tokens"] == "10000"
    assert remaining(first) == (99, 10_000 - cost)
    assert remaining(second) == (98, 10_000 - cost - (cost - 12 + 50))
    assert failed.status_code == 500 and remaining(failed)[0] == 97  # an upstream failure still counts
    # The reset says when the bucket is full again: one request refills in FROZEN / 100 s.
    assert seconds(first.headers["x-ratelimit-reset-requests"]) == pytest.approx(FROZEN / 100, abs=1)
    assert seconds(second.headers["x-ratelimit-reset-requests"]) == pytest.approx(2 * FROZEN / 100, abs=1)
    assert first.headers["x-ratelimit-reset-requests"] == "27h46m40s"


async def test_a_spent_budget_answers_429_until_it_is_scripted_back(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    sim.set_headroom(limit_requests=3, window_s=3600, remaining_requests=1)
    assert (await client.post("/chat/completions", json=chat())).status_code == 200

    refused = await client.post("/chat/completions", json=chat())
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    # One request refills in 3600 s / 3 = 20 minutes (a little less by now).
    wait = re.search(r"Limit 3, Used 3, Requested 1\. Please try again in (\S+)\. Visit", error["message"])
    assert wait and seconds(wait[1]) == pytest.approx(1200, abs=5)
    assert int(refused.headers["retry-after-ms"]) == pytest.approx(1_200_000, abs=5000)
    assert refused.headers["retry-after"] == "1200"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert sim.headroom.remaining_requests == 0  # a refused request spends nothing

    sim.set_headroom(remaining_requests=3)
    response = await client.post("/chat/completions", json=chat())
    assert response.status_code == 200 and remaining(response)[0] == 2


async def test_the_token_budget_refuses_and_a_too_large_request_is_told_so(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    sim.set_headroom(limit_tokens=1000, remaining_tokens=100, window_s=FROZEN)
    refused = await client.post("/chat/completions", json=chat(max_completion_tokens=200))
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["type"] == "tokens" and "tokens per min (TPM): Limit 1000, Used 900" in error["message"]
    assert int(refused.headers["retry-after-ms"]) > 0

    too_large = await client.post("/chat/completions", json=chat(max_completion_tokens=5000))
    assert too_large.status_code == 429
    error = too_large.json()["error"]
    assert error["message"].startswith("Request too large for gpt-4o-mini")
    assert "retry-after-ms" not in too_large.headers

    fits = await client.post("/chat/completions", json=chat(max_completion_tokens=10))
    assert fits.status_code == 200


async def test_one_instance_runs_low_while_another_stays_high() -> None:
    low, high = Simulator(), Simulator()
    async with low, high, httpx.AsyncClient(headers={"authorization": f"Bearer {KEY}"}, timeout=5) as http:
        low.set_headroom(limit_requests=5, window_s=FROZEN)
        seen: dict[str, list[int]] = {"low": [], "high": []}
        for _ in range(5):
            for name, sim in (("low", low), ("high", high)):
                response = await http.post(f"{sim.base_url}/chat/completions", json=chat())
                seen[name].append(remaining(response)[0])
        assert seen["low"] == [4, 3, 2, 1, 0]
        assert min(seen["high"]) >= 999_990  # the default budget refills faster than it is spent
        assert (await http.post(f"{low.base_url}/chat/completions", json=chat())).status_code == 429
        assert (await http.post(f"{high.base_url}/chat/completions", json=chat())).status_code == 200


async def test_the_control_endpoint_scripts_and_reads_the_budget(sim: Simulator) -> None:
    async with httpx.AsyncClient(base_url=sim.root_url, timeout=5) as http:
        response = await http.post(
            "/_simulator/ratelimit", json={"limit_requests": 50, "remaining_requests": 7, "window_s": 600}
        )
        assert response.status_code == 200
        state = response.json()
        assert (state["limit_requests"], state["remaining_requests"], state["window_s"]) == (50, 7, 600)
        assert sim.headroom.remaining_requests == 7
        assert (await http.get("/_simulator/ratelimit")).json()["remaining_requests"] == 7

        for bad in ({"remaining_requests": 51}, {"limit_tokens": 0}, {"window_s": -1}, {"nope": 1}):
            response = await http.post("/_simulator/ratelimit", json=bad)
            assert response.status_code == 400, bad
            assert response.json()["error"]
        assert (await http.post("/_simulator/ratelimit", content=b"[1]")).status_code == 400
        assert sim.headroom.remaining_requests == 7


async def test_the_instance_scenario_fails_every_request_until_cleared(
    sim: Simulator, client: httpx.AsyncClient
) -> None:
    sim.set_scenario("status=503")
    assert (await client.post("/chat/completions", json=chat())).status_code == 503
    # A request's own items win a repeated key.
    assert (await client.post("/chat/completions", json=chat("gpt-4o-mini::status=500"))).status_code == 500

    async with httpx.AsyncClient(base_url=sim.root_url, timeout=5) as http:
        assert (await http.get("/_simulator/scenario")).json() == {"scenario": "status=503"}
        response = await http.post("/_simulator/scenario", json={"scenario": "bogus_key"})
        assert response.status_code == 400 and "bogus_key" in response.json()["error"]
        assert (await http.post("/_simulator/scenario", json={"scenario": ""})).status_code == 200
    assert (await client.post("/chat/completions", json=chat())).status_code == 200

    async with Simulator(scenario="rate_limit,times=1") as failing:
        url = f"{failing.base_url}/chat/completions"
        headers = {"x-client-request-id": "call-1"}
        assert (await client.post(url, json=chat(), headers=headers)).status_code == 429
        assert (await client.post(url, json=chat(), headers=headers)).status_code == 200


async def test_keys_are_recorded_as_fingerprints_and_names(client: httpx.AsyncClient) -> None:
    sim = Simulator(keys={"project-a": KEY})
    async with sim, httpx.AsyncClient(base_url=sim.base_url, timeout=5) as http:
        ok = await http.post("/chat/completions", json=chat(), headers={"authorization": f"Bearer {KEY}"})
        wrong = await http.post(
            "/chat/completions", json=chat(), headers={"authorization": "Bearer sk-other"}
        )
        stats = (await http.get(f"{sim.root_url}/_simulator/stats")).content
    assert ok.status_code == 200
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert "x-ratelimit-remaining-requests" not in wrong.headers
    assert [(r.auth_scheme, r.key_name, r.key_fingerprint) for r in sim.requests] == [
        ("bearer", "project-a", fingerprint(KEY)),
        ("bearer", None, fingerprint("sk-other")),
    ]
    assert KEY.encode() not in stats and b"sk-other" not in stats
    assert orjson.loads(stats)["requests"][0]["key_name"] == "project-a"
