"""The simulator's rate-limit budget with an injected clock, OpenAI's duration format,
Azure's route parsing, key fingerprints, and that every option is documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatgate_server.simulator.azure import AzureRoute, parse_route, version_error
from chatgate_server.simulator.cli import build_parser
from chatgate_server.simulator.keys import KeyRing, fingerprint
from chatgate_server.simulator.ratelimit import RateBudget, go_duration, openai_headers


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def budget(clock: Clock, **kwargs: float) -> RateBudget:
    return RateBudget(limit_requests=10, limit_tokens=1000, window_s=60, clock=clock, **kwargs)


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0s"),
        (-5, "0s"),
        (20, "20ms"),
        (999, "999ms"),
        (1000, "1s"),
        (1500, "1.5s"),
        (17_280, "17.28s"),
        (60_000, "1m0s"),
        (360_000, "6m0s"),
        (90_500, "1m30.5s"),
        (3_723_000, "1h2m3s"),
    ],
)
def test_go_duration(ms: int, text: str) -> None:
    assert go_duration(ms) == text


def test_spending_lowers_what_remains_and_the_reset_says_when_it_is_full() -> None:
    clock = Clock()
    rates = budget(clock)
    assert rates.spend(100) is None
    room = rates.headroom()
    assert (room.remaining_requests, room.remaining_tokens) == (9, 900)
    assert room.reset_requests_ms == 6000  # one request of ten refills in 60 s / 10
    assert room.reset_tokens_ms == 6000
    assert dict(openai_headers(room))["x-ratelimit-reset-requests"] == "6s"

    clock.now += 3  # half a request and 50 tokens come back
    room = rates.headroom()
    assert (room.remaining_requests, room.remaining_tokens) == (9, 950)
    assert room.reset_requests_ms == 3000

    clock.now += 100  # never above the limit
    room = rates.headroom()
    assert (room.remaining_requests, room.remaining_tokens, room.reset_tokens_ms) == (10, 1000, 0)


def test_an_empty_bucket_refuses_without_spending_and_says_how_long_to_wait() -> None:
    clock = Clock()
    rates = budget(clock)
    rates.set(remaining_requests=0)
    refusal = rates.spend(10)
    assert refusal is not None
    assert (refusal.kind, refusal.limit, refusal.used, refusal.requested) == ("requests", 10, 10, 1)
    assert refusal.retry_after_ms == 6000
    assert rates.headroom().remaining_tokens == 1000

    clock.now += 6
    assert rates.spend(10) is None

    rates.set(remaining_requests=10, remaining_tokens=50)
    refusal = rates.spend(80)
    assert refusal is not None and refusal.kind == "tokens"
    assert (refusal.used, refusal.requested) == (950, 80)
    assert refusal.retry_after_ms == 1800  # 30 tokens at 1000 per 60 s

    refusal = rates.spend(5000)
    assert refusal is not None and refusal.too_large and refusal.requested == 5000


def test_set_validates_and_a_lower_limit_lowers_what_remains() -> None:
    rates = budget(Clock())
    room = rates.set(limit_requests=4)
    assert (room.limit_requests, room.remaining_requests) == (4, 4)
    for bad in (
        {"limit_requests": 0},
        {"limit_tokens": -1},
        {"remaining_requests": 5},
        {"remaining_tokens": -1},
        {"window_s": 0},
        {"window_s": float("inf")},
    ):
        with pytest.raises(ValueError, match="must be"):
            rates.set(**bad)
    assert rates.headroom().limit_requests == 4


def test_azure_routes_and_versions() -> None:
    versions = frozenset({"2024-10-21"})
    classic = parse_route("/openai/deployments/chat/chat/completions", "api-version=2024-10-21")
    assert classic == AzureRoute("chat", "2024-10-21", v1=False)
    assert version_error(classic, versions) is None
    assert parse_route("/openai/deployments/my%20dep/chat/completions", "") == AzureRoute(
        "my dep", None, v1=False
    )
    assert parse_route("/openai/v1/chat/completions", "") == AzureRoute(None, None, v1=True)
    for path in (
        "/openai/deployments//chat/completions",
        "/openai/deployments/a/b/chat/completions",
        "/v1/chat",
    ):
        assert parse_route(path, "") is None

    missing = version_error(AzureRoute("chat", None, v1=False), versions)
    assert missing is not None and missing.status == 404
    unsupported = version_error(AzureRoute("chat", "2023-01-01", v1=False), versions)
    assert unsupported is not None and unsupported.status == 400
    assert version_error(AzureRoute(None, "preview", v1=True), versions) is None
    dated_on_v1 = version_error(AzureRoute(None, "2024-10-21", v1=True), versions)
    assert dated_on_v1 is not None and dated_on_v1.status == 400


def test_keys_are_fingerprinted_and_named() -> None:
    assert fingerprint("sk-a") == fingerprint("sk-a") != fingerprint("sk-b")
    assert len(fingerprint("sk-a")) == 12 and "sk-a" not in fingerprint("sk-a")
    open_ring, ring = KeyRing(), KeyRing({"east": "sk-a"})
    assert open_ring.accepts(open_ring.seen("bearer", "anything"))
    seen = ring.seen("api-key", "sk-a")
    assert (seen.scheme, seen.name, seen.fingerprint) == ("api-key", "east", fingerprint("sk-a"))
    assert ring.accepts(seen)
    assert not ring.accepts(ring.seen("api-key", "sk-b"))
    with pytest.raises(ValueError, match="non-empty"):
        KeyRing({"east": ""})


def test_every_option_is_in_help_and_in_the_docs() -> None:
    parser = build_parser()
    text = parser.format_help()
    docs = (Path(__file__).resolve().parents[2] / "docs" / "SIMULATOR.md").read_text()
    options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    assert {
        "--flavor",
        "--deployment",
        "--api-version",
        "--key-env",
        "--scenario",
        "--limit-requests",
    } <= set(options)
    for option in options:
        assert option in text, option
        if option != "--help":
            assert f"`{option}" in docs, option
    for endpoint in ("/_simulator/ratelimit", "/_simulator/scenario", "/openai/deployments/"):
        assert endpoint in text and endpoint in docs
