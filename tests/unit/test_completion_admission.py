"""admit → attempt → settle through CompletionService, with a fake upstream and policies.

What a policy author relies on: every ticket is settled with the call's final record or
released, exactly once, whatever the end; a policy's refusal leaves a ``rejected`` row
and never reaches the upstream; a precondition's refusal leaves no row; an amended
request is what the upstream gets.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence

import pytest

from chatgate_server.admission import AdmissionChain, Ticket
from chatgate_server.completion import CompletionService, OutboundEvent, StreamFinished, StreamStarted
from chatgate_server.deadline import Deadline
from chatgate_server.domain import (
    Allowance,
    ChatMessage,
    CompletionRequest,
    ContentDelta,
    CostBasis,
    Finish,
    LimitKind,
    Outcome,
    ResponseStarted,
    SamplingOptions,
    TokenUsage,
    UpstreamEvent,
    UsageRecord,
    UsageReported,
)
from chatgate_server.errors import ChatgateError, DuplicateRequest, PermissionDenied, UpstreamRejected
from chatgate_server.upstream.breaker import CircuitBreaker
from chatgate_server.upstream.deployment import Deployment
from chatgate_server.upstream.retry import RetryPolicy
from chatgate_server.upstream.router import Router


class FakeStream:
    def __init__(self, events: Sequence[UpstreamEvent], hang_after: int | None) -> None:
        self._events = events
        self._hang_after = hang_after
        self.closed = False

    async def events(self) -> AsyncIterator[UpstreamEvent]:
        for i, event in enumerate(self._events):
            if i == self._hang_after:
                await asyncio.Event().wait()  # the upstream stalls mid-answer
            yield event

    async def aclose(self) -> None:
        self.closed = True


class FakeUpstream:
    """Answers "Hello there" with reported usage; or fails; or stalls after two events."""

    name = "fake"

    def __init__(self, *, fail: ChatgateError | None = None, hang_after: int | None = None) -> None:
        self.fail = fail
        self.hang_after = hang_after
        self.opened: list[CompletionRequest] = []
        self.streams: list[FakeStream] = []

    async def open(self, request: CompletionRequest, deadline: Deadline) -> FakeStream:
        self.opened.append(request)
        if self.fail is not None:
            raise self.fail
        stream = FakeStream(
            [
                ResponseStarted("resp-1", "gpt-4o-mini-2024-07-18"),
                ContentDelta("Hello"),
                ContentDelta(" there"),
                Finish("stop"),
                UsageReported(TokenUsage(input_tokens=12, output_tokens=2)),
            ],
            self.hang_after,
        )
        self.streams.append(stream)
        return stream

    async def aclose(self) -> None:
        pass


class Sink:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def submit(self, record: UsageRecord) -> None:
        self.records.append(record)


class Estimator:
    def estimate(self, request: CompletionRequest, relayed: Sequence[str]) -> TokenUsage:
        return TokenUsage(input_tokens=7, output_tokens=len(relayed), source="estimated")


class Recording(Ticket):
    """A ticket that writes down what happened to it."""

    __slots__ = ("cap", "log", "name")

    @property
    def allowances(self) -> tuple[Allowance, ...]:
        return (Allowance(f"tenant:{self.name}", LimitKind.CONCURRENT_STREAMS, 4, 3, None),)

    def __init__(self, name: str, log: list[tuple[str, str, object]], cap: int | None) -> None:
        self.name, self.log, self.cap = name, log, cap

    def amend(self, request: CompletionRequest) -> CompletionRequest:
        if self.cap is None:
            return request
        return dataclasses.replace(request, sampling=SamplingOptions(max_completion_tokens=self.cap))

    def settle(self, record: UsageRecord) -> UsageRecord:
        self.log.append(("settle", self.name, record.outcome))
        return dataclasses.replace(record, tags={**record.tags, self.name: "settled"})

    def release(self) -> None:
        self.log.append(("release", self.name, None))


class Policy:
    def __init__(
        self,
        name: str,
        log: list[tuple[str, str, object]],
        *,
        refuse: ChatgateError | None = None,
        cap: int | None = None,
        block: asyncio.Event | None = None,
    ) -> None:
        self.name, self.log, self.refuse, self.cap, self.block = name, log, refuse, cap, block
        self.seen: list[CompletionRequest] = []

    async def admit(self, request: CompletionRequest) -> Ticket:
        self.seen.append(request)
        if self.block is not None:
            await self.block.wait()
        if self.refuse is not None:
            raise self.refuse
        return Recording(self.name, self.log, self.cap)


def request() -> CompletionRequest:
    return CompletionRequest(
        request_id="r-1",
        model="gpt-4o-mini",
        messages=(ChatMessage(role="user", content="Hi"),),
        user_id="u-1",
    )


def service(upstream: FakeUpstream, sink: Sink, chain: AdmissionChain) -> CompletionService:
    only = Deployment("fake", upstream, CircuitBreaker("fake"))
    return CompletionService(
        Router([only]),
        sink,
        Estimator(),
        admission=chain,
        retry_policy=RetryPolicy(max_attempts=1),
    )


async def run(svc: CompletionService) -> list[OutboundEvent]:
    sent: list[OutboundEvent] = []

    async def send(event: OutboundEvent) -> None:
        sent.append(event)

    await svc.run(request(), Deadline.start(None, 5.0), send)
    return sent


async def test_a_completed_call_settles_every_ticket_in_order_and_writes_what_they_return() -> None:
    log: list[tuple[str, str, object]] = []
    sink, upstream = Sink(), FakeUpstream()
    chain = AdmissionChain([Policy("ids", log)], [Policy("blocks", log), Policy("limits", log)])
    sent = await run(service(upstream, sink, chain))

    assert isinstance(sent[-1], StreamFinished) and sent[-1].outcome is Outcome.COMPLETED
    assert log == [
        ("settle", "ids", Outcome.COMPLETED),
        ("settle", "blocks", Outcome.COMPLETED),
        ("settle", "limits", Outcome.COMPLETED),
    ]
    [row] = sink.records
    assert row.outcome is Outcome.COMPLETED and row.usage.output_tokens == 2
    assert row.tags == {"ids": "settled", "blocks": "settled", "limits": "settled"}


async def test_a_policy_refusal_leaves_a_rejected_row_and_never_reaches_the_upstream() -> None:
    log: list[tuple[str, str, object]] = []
    sink, upstream = Sink(), FakeUpstream()
    refusal = PermissionDenied("tenant acme is blocked: abuse review")
    late = Policy("limits", log)
    chain = AdmissionChain([Policy("ids", log)], [Policy("blocks", log, refuse=refusal), late])

    with pytest.raises(PermissionDenied):
        await run(service(upstream, sink, chain))

    assert upstream.opened == [] and late.seen == []
    assert log == [("settle", "ids", Outcome.REJECTED)]  # the ticket taken before the refusal
    [row] = sink.records
    assert (row.outcome, row.grpc_status, row.attempts) == (Outcome.REJECTED, "PERMISSION_DENIED", 0)
    assert row.usage.input_tokens == row.usage.output_tokens == 0
    assert row.cost.usd_micros == 0 and row.cost.basis is CostBasis.NOT_CHARGED
    assert (row.user_id, row.requested_model) == ("u-1", "gpt-4o-mini")


async def test_a_precondition_refusal_leaves_no_row_and_releases_what_was_taken() -> None:
    log: list[tuple[str, str, object]] = []
    sink, upstream = Sink(), FakeUpstream()
    taken = DuplicateRequest("request_id 'r-1' was already served")
    preconditions = [Policy("capacity", log), Policy("ids", log, refuse=taken)]
    chain = AdmissionChain(preconditions, [Policy("limits", log)])

    with pytest.raises(DuplicateRequest):
        await run(service(upstream, sink, chain))

    assert sink.records == [] and upstream.opened == []
    assert log == [("release", "capacity", None)]


async def test_an_upstream_failure_settles_with_the_failed_record() -> None:
    log: list[tuple[str, str, object]] = []
    sink = Sink()
    upstream = FakeUpstream(fail=UpstreamRejected("the upstream refused the request"))
    chain = AdmissionChain([], [Policy("limits", log)])

    with pytest.raises(UpstreamRejected):
        await run(service(upstream, sink, chain))

    assert log == [("settle", "limits", Outcome.UPSTREAM_ERROR)]
    assert [r.outcome for r in sink.records] == [Outcome.UPSTREAM_ERROR]


async def test_a_caller_who_leaves_mid_stream_is_settled_with_what_was_relayed() -> None:
    log: list[tuple[str, str, object]] = []
    sink, upstream = Sink(), FakeUpstream(hang_after=2)
    svc = service(upstream, sink, AdmissionChain([], [Policy("limits", log)]))
    call = asyncio.create_task(run(svc))
    await asyncio.sleep(0.05)  # "Hello" relayed, then the upstream stalls
    assert upstream.streams and not call.done()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    assert upstream.streams[0].closed
    assert log == [("settle", "limits", Outcome.CANCELLED)]
    [row] = sink.records
    assert row.outcome is Outcome.CANCELLED and row.usage.source == "estimated"
    assert row.usage.output_tokens == 1  # "Hello" was relayed before the caller left


async def test_a_call_cancelled_while_a_precondition_waits_leaves_no_row() -> None:
    log: list[tuple[str, str, object]] = []
    sink, upstream = Sink(), FakeUpstream()
    waiting = asyncio.Event()
    chain = AdmissionChain([Policy("capacity", log), Policy("ids", log, block=waiting)], [])
    call = asyncio.create_task(run(service(upstream, sink, chain)))
    await asyncio.sleep(0.01)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert sink.records == [] and log == [("release", "capacity", None)]


async def test_the_upstream_gets_the_request_as_amended_by_the_policies() -> None:
    log: list[tuple[str, str, object]] = []
    sink, upstream = Sink(), FakeUpstream()
    limits = Policy("limits", log, cap=256)
    after = Policy("after", log)
    await run(service(upstream, sink, AdmissionChain([], [limits, after])))

    assert limits.seen[0].sampling.max_completion_tokens is None
    assert after.seen[0].sampling.max_completion_tokens == 256  # later policies see it too
    assert upstream.opened[0].sampling.max_completion_tokens == 256


async def test_the_first_event_tells_the_caller_every_allowance_in_policy_order() -> None:
    log: list[tuple[str, str, object]] = []
    chain = AdmissionChain([Policy("ids", log)], [Policy("limits", log)])
    sent = await run(service(FakeUpstream(), Sink(), chain))
    first = sent[0]
    assert isinstance(first, StreamStarted)
    assert [a.subject for a in first.allowances] == ["tenant:ids", "tenant:limits"]


def test_without_preconditions_a_call_leaves_a_row_from_its_start() -> None:
    # CompletionService reaches no await before admit() sets it anyway; the chain's
    # promise is pinned here for any other caller of start().
    log: list[tuple[str, str, object]] = []
    assert AdmissionChain([], [Policy("limits", log)]).start(request()).recorded is True
    assert AdmissionChain([Policy("ids", log)], []).start(request()).recorded is False
