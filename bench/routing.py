"""What the router costs per call and per attempt, without sockets.

    .venv/bin/python -m bench.routing [--calls 200000] [--rounds 5]

Each case plans a call (``Router.plan``), takes a leg per attempt (``RoutePlan.next``:
breaker permit, stream count) and ends it as the completion service does (``failed`` per
failed attempt, ``succeeded`` at the end). Cases: one deployment (the zero-config
default); two, ordered; two, weighted (a draw by weight × headroom per call); three,
weighted, with headroom read from each deployment's rate-limit headers; and a failover
(the first deployment fails, the second serves: two attempts). Prints microseconds per
call and per attempt, best of ``--rounds``, as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from chatgate_server.deadline import Deadline
from chatgate_server.domain import ChatMessage, CompletionRequest
from chatgate_server.errors import UpstreamError
from chatgate_server.upstream.base import UpstreamStream
from chatgate_server.upstream.breaker import CircuitBreaker
from chatgate_server.upstream.deployment import Deployment
from chatgate_server.upstream.router import Route, Router

_REQUEST = CompletionRequest(
    request_id="r", model="m", messages=(ChatMessage(role="user", content="hi"),), user_id="u"
)
# OpenAI's rate-limit headers, as the adapter hands them to the headroom reader.
_HEADERS = [
    (b"x-ratelimit-limit-requests", b"10000"),
    (b"x-ratelimit-remaining-requests", b"9000"),
    (b"x-ratelimit-limit-tokens", b"2000000"),
    (b"x-ratelimit-remaining-tokens", b"1500000"),
    (b"x-ratelimit-reset-requests", b"6ms"),
    (b"x-ratelimit-reset-tokens", b"1.5s"),
]


class _NoUpstream:
    name = "openai"

    async def open(self, request: CompletionRequest, deadline: Deadline) -> UpstreamStream:
        raise AssertionError("not opened in a routing benchmark")

    async def aclose(self) -> None:
        return None


def _deployment(name: str, weight: float = 1.0) -> Deployment:
    return Deployment(name, _NoUpstream(), CircuitBreaker(name), models={"m": "gpt-4o-mini"}, weight=weight)


@dataclass(frozen=True)
class Case:
    name: str
    router: Router
    attempts: int  # per call: 1, or 2 when the first deployment fails
    read_headers: bool = False


def _cases() -> list[Case]:
    one = [_deployment("a")]
    two = [_deployment("a"), _deployment("b")]
    three = [_deployment("a", 2), _deployment("b", 1), _deployment("c", 1)]
    return [
        Case("1 deployment", Router(one), 1),
        Case("2 deployments, ordered", Router(two, {"m": Route("m", "m", tuple(two))}), 1),
        Case("2 deployments, weighted", Router(two, {"m": Route("m", "m", tuple(two), weighted=True)}), 1),
        Case(
            "3 deployments, weighted, headroom read",
            Router(three, {"m": Route("m", "m", tuple(three), weighted=True)}),
            1,
            read_headers=True,
        ),
        Case("2 deployments, failover (2 attempts)", Router(two, {"m": Route("m", "m", tuple(two))}), 2),
    ]


def _run(case: Case, calls: int) -> float:
    """Seconds for ``calls`` calls of ``case``."""
    router, attempts, read = case.router, case.attempts, case.read_headers
    failure = UpstreamError("500", http_status=500)
    failure.breaker_failure = False  # keep the breakers closed whatever the count
    t0 = time.perf_counter()
    for _ in range(calls):
        plan = router.plan("m")
        for attempt in range(attempts):
            leg = plan.next()
            leg.request(_REQUEST)
            if read:
                leg.deployment.headroom.observe(_HEADERS, 200)
            if attempt < attempts - 1:
                plan.failed(failure)
        plan.succeeded()
    return time.perf_counter() - t0


def _best(run: Callable[[], float], rounds: int) -> float:
    return min(run() for _ in range(rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for case in _cases():
        seconds = _best(lambda case=case: _run(case, args.calls), args.rounds)  # type: ignore[misc]
        per_call = seconds / args.calls * 1e6
        print(
            json.dumps(
                {
                    "case": case.name,
                    "us_per_call": round(per_call, 2),
                    "us_per_attempt": round(per_call / case.attempts, 2),
                }
            )
        )


if __name__ == "__main__":
    main()
