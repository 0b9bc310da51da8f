"""What limits add to one call in-process: CPU per call with none, three and eight limits.

``python -m bench.limits_cost [--calls 5000] [--rounds 5] [--profile]
[--system-prompt-chars N [--no-repeated-counts]]`` runs calls
through :class:`~chatgate_server.completion.CompletionService` with a fake upstream
(five events, usage reported), each event turned into its protobuf form as the RPC
layer does, and the limits policy in front — over an in-memory stand-in for the shared
counters that grants whatever is asked (so no statement is ever waited for). The
limits are those of the suite's ``chatgate-limits`` and ``chatgate-limits8`` targets.
It prints the median CPU µs per call of each set and what each adds to none; rounds
are interleaved so that neighbours' noise falls on every set alike. ``--profile``
prints a cProfile of the eight-limit set instead.

No network, no Postgres: this isolates the limits' own Python from the noise of a
whole server (docs/PERFORMANCE.md, "Limits").
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from chatgate_server.admission import AdmissionChain
from chatgate_server.completion import CompletionService, OutboundEvent
from chatgate_server.deadline import Deadline
from chatgate_server.domain import (
    Caller,
    ChatMessage,
    CompletionRequest,
    ContentDelta,
    Finish,
    LimitKind,
    ResponseStarted,
    TokenUsage,
    UpstreamEvent,
    UsageRecord,
    UsageReported,
)
from chatgate_server.limits.buckets import BucketTake
from chatgate_server.limits.definitions import Definition, Scope, Target
from chatgate_server.limits.engine import Leaser
from chatgate_server.limits.leases import PoolGrant, PoolSync
from chatgate_server.limits.policy import LimitPolicy
from chatgate_server.limits.table import LimitIndex
from chatgate_server.rpc.convert import to_proto
from chatgate_server.upstream.breaker import CircuitBreaker
from chatgate_server.upstream.deployment import Deployment
from chatgate_server.upstream.retry import RetryPolicy
from chatgate_server.upstream.router import Router
from chatgate_server.usage import tokens
from chatgate_server.usage.pricing import default_table
from chatgate_server.usage.tokens import TiktokenEstimator, warm_up

HUGE = 10**12
EVENTS: tuple[UpstreamEvent, ...] = (
    ResponseStarted("resp-1", "gpt-4o-mini-2024-07-18"),
    ContentDelta("Hello"),
    ContentDelta(" there"),
    Finish("stop"),
    UsageReported(TokenUsage(input_tokens=12, output_tokens=2)),
)


class _Stream:
    async def events(self) -> AsyncIterator[UpstreamEvent]:
        for event in EVENTS:
            yield event

    async def aclose(self) -> None:
        pass


class _Upstream:
    name = "fake"

    async def open(self, request: CompletionRequest, deadline: Deadline) -> _Stream:
        return _Stream()

    async def aclose(self) -> None:
        pass


class _Sink:
    def submit(self, record: UsageRecord) -> None:
        pass


class _Counters:
    """Grants every want at once and takes back every give-back (limits far above load)."""

    ttl_s = 30.0
    statements = 0

    async def pool_sync(self, pool: str, ends_at: datetime | None, amount: int, sync: PoolSync) -> PoolGrant:
        self.statements += 1
        return PoolGrant(sync.want + 10**9, sync.want, HUGE)

    async def bucket_take(
        self, bucket: str, capacity: float, per_s: float, take: BucketTake
    ) -> tuple[int, float]:
        self.statements += 1
        return take.want, capacity

    async def heartbeat(self, live_s: float) -> int:
        return 1

    async def leave(self) -> None:
        pass


class _Table:
    def __init__(self, index: LimitIndex) -> None:
        self.index = index

    def applicable(self, tenant: str, caller: str, user: str, model: str) -> object:
        return self.index.applicable(tenant, caller, user, model)


def _definitions(tenant: str, eight: bool) -> list[Definition]:
    if not eight:
        return [
            Definition(Target(Scope.TENANT, tenant), LimitKind.REQUESTS_PER_MINUTE, HUGE),
            Definition(Target(Scope.USER, tenant, "*"), LimitKind.TOKENS_PER_DAY, HUGE),
            Definition(Target(Scope.USER, tenant, "*"), LimitKind.CONCURRENT_STREAMS, 10**6),
        ]
    kinds = (
        LimitKind.REQUESTS_PER_MINUTE,
        LimitKind.TOKENS_PER_MINUTE,
        LimitKind.TOKENS_PER_DAY,
        LimitKind.CONCURRENT_STREAMS,
    )
    targets = (Target(Scope.TENANT, tenant), Target(Scope.USER, tenant, "*"))
    return [
        Definition(t, k, HUGE if k is not LimitKind.CONCURRENT_STREAMS else 10**6)
        for t in targets
        for k in kinds
    ]


def _service(limits: int) -> CompletionService:
    deployment = Deployment("fake", _Upstream(), CircuitBreaker("fake"))
    # As in the server: the policy is there for every call; calls of a tenant with no
    # limits pass it with one lookup.
    tenant = "bench" if limits else "another"
    index = LimitIndex(_definitions(tenant, limits == 8), datetime.now(UTC))
    leaser = Leaser(_Counters())  # type: ignore[arg-type]
    policy = LimitPolicy(_Table(index), leaser, TiktokenEstimator(), default_table())  # type: ignore[arg-type]
    return CompletionService(
        Router([deployment]),
        _Sink(),
        TiktokenEstimator(),
        admission=AdmissionChain([], [policy]),
        retry_policy=RetryPolicy(max_attempts=1),
    )


# A service's system prompt, the same on every call (``--system-prompt-chars``).
_SYSTEM = "You are ACME's support assistant. Answer about products, policies and orders; cite the section. "


def _request(i: int, system_chars: int = 0) -> CompletionRequest:
    system = (_SYSTEM * (system_chars // len(_SYSTEM) + 1))[:system_chars]
    # A new str each call, as each request decodes its own: nothing cached on the object.
    prompt = (ChatMessage(role="system", content="".join(list(system))),) if system_chars else ()
    return CompletionRequest(
        request_id=f"r-{i}",
        model="gpt-4o-mini",
        messages=(*prompt, ChatMessage(role="user", content=f"Say something, one word per chunk. ({i})")),
        user_id=f"bench-user-{i % 50}",
        caller=Caller(tenant="bench", service="loadgen"),
    )


async def _send(event: OutboundEvent) -> None:
    to_proto(event).SerializeToString()


async def _calls(svc: CompletionService, n: int, system_chars: int = 0) -> float:
    """CPU seconds for ``n`` calls, one after another."""
    requests = [_request(i, system_chars) for i in range(n)]
    start = time.process_time()
    for request in requests:
        await svc.run(request, Deadline.start(None, 30.0), _send)
    return time.process_time() - start


async def _measure(calls: int, rounds: int, system_chars: int) -> dict[int, list[float]]:
    services = {n: _service(n) for n in (0, 3, 8)}
    for svc in services.values():
        await _calls(svc, 500, system_chars)  # warm: accounts made, slices granted, caches filled
    out: dict[int, list[float]] = {n: [] for n in services}
    for _ in range(rounds):
        for n, svc in services.items():
            out[n].append(await _calls(svc, calls, system_chars) / calls * 1e6)
            await asyncio.sleep(0)  # let background syncs run between rounds
    return out


async def _profile(calls: int) -> None:
    svc = _service(8)
    await _calls(svc, 500)
    profiler = cProfile.Profile()
    profiler.enable()
    await _calls(svc, calls)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(40)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.limits_cost", description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="cProfile the eight-limit set")
    p.add_argument(
        "--system-prompt-chars",
        type=int,
        default=0,
        help="add a system prompt of this many characters, the same on every call",
    )
    p.add_argument(
        "--no-repeated-counts",
        action="store_true",
        help="tokenize every long text again (what the estimator did before it kept their counts)",
    )
    args = p.parse_args(argv)
    warm_up()
    if args.no_repeated_counts:
        tokens._REPEATED_MIN_CHARS = 1 << 62
    if args.profile:
        asyncio.run(_profile(args.calls))
        return 0
    results = asyncio.run(_measure(args.calls, args.rounds, args.system_prompt_chars))
    base = statistics.median(results[0])
    for n, per_call in results.items():
        median = statistics.median(per_call)
        rounds = ", ".join(f"{x:.1f}" for x in per_call)
        added = "" if n == 0 else f"  +{median - base:.1f} µs"
        print(f"{n} limits: {median:.1f} µs per call (rounds {rounds}){added}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
