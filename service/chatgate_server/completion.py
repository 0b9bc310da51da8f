"""One request's life: deadline, the upstream attempt, relaying events, the usage row.

:meth:`CompletionService.run` drives the whole call and owns every way it can end.
Whatever the end — finished, caller gone, deadline, upstream failure — exactly one
:class:`UsageRecord` goes to the ledger, from the ``finally`` below.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from opentelemetry import trace
from opentelemetry.trace import Span

from chatgate_server.access_log import access_log
from chatgate_server.admission import NO_ADMISSION, AdmissionChain
from chatgate_server.deadline import Deadline
from chatgate_server.domain import (
    Allowance,
    CompletionRequest,
    ContentDelta,
    Cost,
    CostBasis,
    Finish,
    FinishReason,
    Outcome,
    RefusalDelta,
    ResponseStarted,
    TokenUsage,
    ToolCallDelta,
    UpstreamEvent,
    UsageRecord,
    UsageReported,
)
from chatgate_server.errors import (
    ChatgateError,
    DeadlineExceeded,
    ShuttingDown,
    UpstreamError,
    UpstreamProtocolError,
)
from chatgate_server.genai_spans import AttemptTelemetry, error_type
from chatgate_server.logs import bind_request_id
from chatgate_server.telemetry import NO_TELEMETRY, Telemetry
from chatgate_server.upstream.base import UpstreamStream
from chatgate_server.upstream.breaker import BreakerState, CircuitBreaker
from chatgate_server.upstream.retry import RetryDecision, RetryPolicy, with_retries
from chatgate_server.upstream.router import RoutePlan, Router, breaker_failure
from chatgate_server.usage.ledger import UsageSink
from chatgate_server.usage.pricing import PriceTable, default_table
from chatgate_server.usage.tokens import TokenEstimator

log = logging.getLogger(__name__)

# How long a cut call waits for the caller to take its final event.
FINAL_EVENT_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class StreamStarted:
    """Sent first: the request id and the model that answers."""

    request_id: str
    model: str
    upstream_response_id: str
    allowances: tuple[Allowance, ...] = ()


@dataclass(frozen=True, slots=True)
class StreamFinished:
    """Sent last, on every stream that started."""

    outcome: Outcome
    finish_reason: FinishReason | None
    usage: TokenUsage
    cost: Cost
    deployment: str | None = None
    """The deployment (chatgate.toml) that served the stream."""
    fallback_model: str | None = None
    """The route's fallback that served the stream; None when the model asked for did."""


OutboundEvent = StreamStarted | ContentDelta | RefusalDelta | ToolCallDelta | StreamFinished
Send = Callable[[OutboundEvent], Awaitable[None]]


@dataclass(slots=True, eq=False)
class _Progress:
    """What has happened so far in one call; becomes the usage row."""

    started_at: datetime
    t0: float
    spans: AttemptTelemetry
    attempts: int = 0
    deployment: str | None = None  # where the latest attempt went
    fallback_model: str | None = None  # the route's fallback, when the latest attempt served it
    started: StreamStarted | None = None
    first_token_at: float | None = None
    finish_reason: FinishReason | None = None
    reported_usage: TokenUsage | None = None
    # Text relayed to the caller, kept to estimate output tokens when the upstream
    # never reports usage (the caller left, the deadline cut the stream).
    relayed: list[str] = field(default_factory=list)
    # The call's deadline scope while it talks to the upstream: shutdown reschedules it
    # to "now" to cut the call the same way the deadline would.
    scope: asyncio.Timeout | None = None
    shutdown_cut: bool = False
    estimate: TokenUsage | None = None
    allowances: tuple[Allowance, ...] = ()
    service_tier: str | None = None  # the tier the upstream says serves the call

    def cut_for_shutdown(self) -> None:
        self.shutdown_cut = True
        if self.scope is not None and not self.scope.expired():
            self.scope.reschedule(asyncio.get_running_loop().time())

    # Identity semantics: progress objects live in a set of running calls.
    __hash__ = object.__hash__


@dataclass(slots=True)
class _Opened:
    """An attempt that got as far as its first event."""

    stream: UpstreamStream
    events: AsyncIterator[UpstreamEvent]
    first: UpstreamEvent
    span: Span
    span_started: float
    first_at: float

    async def aclose(self) -> None:
        await _close(self.events, self.stream)


async def _close(events: AsyncIterator[UpstreamEvent] | None, stream: UpstreamStream | None) -> None:
    if events is not None:
        await events.aclose()  # type: ignore[attr-defined]
    if stream is not None:
        await stream.aclose()


def _breaker_event(name: str, old: BreakerState, new: BreakerState) -> None:
    """Breaker transitions show up on the span of the call that caused them."""
    trace.get_current_span().add_event(
        "chatgate.breaker.transition",
        {
            "chatgate.breaker.name": name,
            "chatgate.breaker.from": old.name.lower(),
            "chatgate.breaker.to": new.name.lower(),
        },
    )


def _outcome_of(exc: ChatgateError, progress: _Progress) -> Outcome:
    if progress.attempts == 0:
        return Outcome.REJECTED  # never reached the upstream
    if isinstance(exc, ShuttingDown):
        return Outcome.SHUTDOWN
    if isinstance(exc, DeadlineExceeded):
        return Outcome.DEADLINE_EXCEEDED
    return Outcome.UPSTREAM_ERROR


class CompletionService:
    """Streams completions from the router's deployments and bills each request exactly once."""

    def __init__(
        self,
        router: Router,
        ledger: UsageSink,
        estimator: TokenEstimator,
        *,
        retry_policy: RetryPolicy | None = None,
        first_byte_timeout_s: float = 30.0,
        telemetry: Telemetry = NO_TELEMETRY,
        admission: AdmissionChain = NO_ADMISSION,
        prices: PriceTable | None = None,
        deployment_prices: Mapping[str, PriceTable] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._router = router
        self._deployment_prices: Mapping[str, PriceTable] = {}
        self._listened: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()
        self.use_router(router, deployment_prices)
        self._admission = admission
        self._telemetry = telemetry
        self._ledger = ledger
        self._estimator = estimator
        self._prices = prices or default_table()
        self._retry_policy = retry_policy or RetryPolicy()
        self._first_byte_timeout_s = first_byte_timeout_s
        self._clock = clock
        self._rng = rng
        self._calls: set[_Progress] = set()
        self._idle = asyncio.Event()
        self._draining = False

    def use_router(self, router: Router, deployment_prices: Mapping[str, PriceTable] | None = None) -> None:
        """New calls route by ``router`` (a reload); running calls keep their own.
        ``deployment_prices``: the tables of deployments priced apart (by name)."""
        for deployment in router.deployments:
            if deployment.breaker not in self._listened:
                self._listened.add(deployment.breaker)
                deployment.breaker.add_listener(_breaker_event)
        self._router = router
        self._deployment_prices = deployment_prices or {}

    async def run(
        self,
        request: CompletionRequest,
        deadline: Deadline,
        send: Send,
        *,
        trace_id: str | None = None,
        span_id: str | None = None,
    ) -> None:
        """Stream one completion to ``send``; raise a ChatgateError if it does not complete.

        ``send`` is awaited for each event in order; it is where gRPC flow control
        pushes back on a slow caller. A CancelledError (the caller left) propagates
        after the upstream is closed and usage recorded.
        """
        bind_request_id(request.request_id)  # every log line of this call carries it
        progress = _Progress(
            started_at=datetime.now(UTC),
            t0=self._clock(),
            spans=AttemptTelemetry(self._telemetry, request),
        )
        outcome = Outcome.INTERNAL_ERROR
        status = "INTERNAL"
        admission = self._admission.start(request)
        self._calls.add(progress)
        try:
            # Every ticket taken here is settled (or released) in the finally below.
            request = await self._admission.admit(admission)
            progress.allowances = admission.allowances()
            if self._draining:
                raise ShuttingDown("chatgate is shutting down; retry on another replica")
            outcome = await self._relay(request, deadline, send, progress)
            status = "OK"
        except asyncio.CancelledError:
            # The caller left — or its own deadline ran out and gRPC cancelled us.
            outcome = Outcome.DEADLINE_EXCEEDED if deadline.expired else Outcome.CANCELLED
            status = "DEADLINE_EXCEEDED" if deadline.expired else "CANCELLED"
            raise
        except ChatgateError as exc:
            outcome = _outcome_of(exc, progress)
            status = exc.status_name
            if progress.started is not None:
                await self._send_final(send, self._finished(request, progress, outcome))
            raise
        finally:
            record = self._record(request, progress, outcome, status, trace_id, span_id)
            if admission.recorded:
                record = admission.settle(record)
                self._ledger.submit(record)
            else:
                admission.release()  # refused by a precondition: the row is not ours to write
            access_log(record)
            self._calls.discard(progress)
            if not self._calls:
                self._idle.set()

    async def _send_final(self, send: Send, event: StreamFinished) -> None:
        """The final event after a cut, bounded: a caller that stopped reading must not
        hold the call (and its usage row) open forever."""
        try:
            async with asyncio.timeout(FINAL_EVENT_TIMEOUT_S):
                while True:
                    try:
                        await send(event)
                        return
                    except asyncio.CancelledError:
                        raise
                    except Exception:  # noqa: BLE001 - the write that the cut interrupted
                        # The cut (deadline or shutdown) can land while a write is in
                        # flight; gRPC then refuses a second write until that one is
                        # done ("too many operations"). It finishes as soon as the
                        # caller reads: try again shortly, within the bound above.
                        await asyncio.sleep(0.01)
        except TimeoutError:
            log.warning("caller did not take the final event within %.0fs", FINAL_EVENT_TIMEOUT_S)

    # --- draining on shutdown ---------------------------------------------------------

    @property
    def active_calls(self) -> int:
        return len(self._calls)

    def stop_admitting(self) -> None:
        """From now on, new calls are refused with UNAVAILABLE (SHUTTING_DOWN)."""
        self._draining = True

    async def drain(self, grace_s: float, hurry: asyncio.Event | None = None) -> None:
        """Let running calls finish for up to ``grace_s`` (less if ``hurry`` is set), then
        cut the rest: each sends its final event (outcome shutdown) and writes its row."""
        self._draining = True
        waiters: list[asyncio.Future[object]] = [asyncio.ensure_future(self._wait_idle())]
        if hurry is not None:
            waiters.append(asyncio.ensure_future(hurry.wait()))
        try:
            await asyncio.wait(waiters, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if self._calls:
            log.warning("cutting %d call(s) still running after the grace period", len(self._calls))
            for progress in list(self._calls):
                progress.cut_for_shutdown()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FINAL_EVENT_TIMEOUT_S + 1):
                    await self._wait_idle()

    async def _wait_idle(self) -> object:
        while self._calls:
            self._idle.clear()
            await self._idle.wait()
        return None

    async def _relay(
        self, request: CompletionRequest, deadline: Deadline, send: Send, progress: _Progress
    ) -> Outcome:
        """Route the call and stream it; then tell the breaker of the deployment that
        served it what the call said about its health."""
        plan = self._router.plan(request.model, request.features)
        trace.get_current_span().set_attribute("chatgate.breaker.state", plan.breaker_state.name.lower())
        try:
            outcome = await self._stream(request, plan, deadline, send, progress)
        except ChatgateError as exc:
            # Counted against the deployment only if it says the upstream cannot answer
            # (router.breaker_failure): caller mistakes, our key, a stream that already
            # delivered content do not.
            plan.judged(
                breaker_failure(
                    exc, started=progress.started is not None, first_token=progress.first_token_at is not None
                )
            )
            raise
        except BaseException:
            plan.release()  # cancelled (or a bug): says nothing about the upstream's health
            raise
        plan.succeeded()
        return outcome

    async def _stream(
        self, request: CompletionRequest, plan: RoutePlan, deadline: Deadline, send: Send, progress: _Progress
    ) -> Outcome:
        opened: _Opened | None = None
        error: BaseException | None = None
        try:
            async with asyncio.timeout(deadline.remaining()) as scope:
                progress.scope = scope
                if progress.shutdown_cut:
                    scope.reschedule(asyncio.get_running_loop().time())
                # Retried only up to the first event: nothing has reached the caller yet.
                opened = await with_retries(
                    lambda: self._attempt(request, plan, deadline, progress),
                    self._retry_policy,
                    deadline,
                    rng=self._rng,
                    on_retry=self._on_retry,
                    failover=plan.would_move,
                )
                await self._handle(opened.first, request, send, progress)
                relayed = progress.relayed
                async for event in opened.events:
                    # Nearly every event is answer text: relay it without the dispatch.
                    if type(event) is ContentDelta and progress.first_token_at is not None:
                        relayed.append(event.text)
                        await send(event)
                    else:
                        await self._handle(event, request, send, progress)
        except TimeoutError:
            if progress.shutdown_cut:
                error = ShuttingDown("chatgate is shutting down; the stream was cut")
            else:
                error = DeadlineExceeded("the deadline was reached before the completion finished")
            raise error from None
        except BaseException as exc:
            error = exc
            raise
        finally:
            progress.scope = None
            # Close at once on every path: after a cancel no further tokens are read.
            if opened is not None:
                await opened.aclose()
                self._end_attempt(opened, request, progress, error)
        await send(self._finished(request, progress, Outcome.COMPLETED))
        return Outcome.COMPLETED

    async def _attempt(
        self, request: CompletionRequest, plan: RoutePlan, deadline: Deadline, progress: _Progress
    ) -> _Opened:
        """One upstream attempt on the deployment the plan picks: open the stream and read
        its first event."""
        leg = plan.next()  # BreakerOpen when every deployment's breaker refuses
        deployment = leg.deployment
        progress.attempts += 1
        progress.deployment = deployment.name
        progress.fallback_model = leg.candidate.fallback
        trace.get_current_span().set_attribute("chatgate.deployment", deployment.name)
        asked = leg.request(request)
        stream: UpstreamStream | None = None
        events: AsyncIterator[UpstreamEvent] | None = None
        span, span_started = progress.spans.start(asked.model, deployment)
        try:
            # Response headers and the first event must come within the first-byte
            # timeout; a hung attempt then becomes a retry instead of eating the deadline.
            async with asyncio.timeout(min(self._first_byte_timeout_s, deadline.remaining())):
                stream = await deployment.upstream.open(asked, deadline)
                events = stream.events()
                first = await anext(events)
            first_at = time.monotonic()
        except BaseException as exc:
            await _close(events, stream)
            error: BaseException = exc
            if isinstance(exc, StopAsyncIteration):
                error = UpstreamProtocolError("the upstream stream ended before its first chunk")
            elif isinstance(exc, TimeoutError) and not deadline.expired:
                error = UpstreamError("the upstream did not start answering in time")
            error = leg.judge(error)
            plan.failed(error)  # judged against this deployment if the call moves on
            if isinstance(error, asyncio.CancelledError):
                span.set_attribute("chatgate.cancelled", True)
                span.end()
            else:
                progress.spans.failed(span, span_started, error)
            if error is exc:
                raise
            raise error from None
        return _Opened(stream, events, first, span, span_started, first_at)

    def _end_attempt(
        self, opened: _Opened, request: CompletionRequest, progress: _Progress, error: BaseException | None
    ) -> None:
        if isinstance(error, asyncio.CancelledError):
            opened.span.set_attribute("chatgate.cancelled", True)
            error = None
        started = progress.started
        if progress.service_tier is not None:
            opened.span.set_attribute("openai.response.service_tier", progress.service_tier)
        progress.spans.streamed(
            opened.span,
            opened.span_started,
            first_chunk_at=opened.first_at,
            response_id=started.upstream_response_id if started else None,
            response_model=started.model if started else None,
            finish_reason=progress.finish_reason,
            usage=self._usage(request, progress),
            error=error,
        )

    def _on_retry(self, attempt: int, error: BaseException, decision: RetryDecision) -> None:
        trace.get_current_span().add_event(
            "chatgate.retry",
            {
                "chatgate.retry.attempt": attempt,
                "chatgate.retry.reason": decision.reason,
                "chatgate.retry.wait_s": decision.wait_s,
                "error.type": error_type(error),
            },
        )
        # The log line is retry.py's, with the upstream status.

    async def _handle(
        self, event: UpstreamEvent, request: CompletionRequest, send: Send, progress: _Progress
    ) -> None:
        if isinstance(event, ContentDelta | RefusalDelta):
            self._mark_first_token(progress)
            progress.relayed.append(event.text)
            await send(event)
        elif isinstance(event, ToolCallDelta):
            self._mark_first_token(progress)
            progress.relayed.append(event.arguments)
            if event.name:
                progress.relayed.append(event.name)
            await send(event)
        elif isinstance(event, ResponseStarted):
            progress.started = StreamStarted(
                request.request_id, event.model, event.response_id, progress.allowances
            )
            progress.service_tier = event.service_tier
            await send(progress.started)
        elif isinstance(event, Finish):
            progress.finish_reason = event.reason
        elif isinstance(event, UsageReported):
            progress.reported_usage = event.usage

    def _mark_first_token(self, progress: _Progress) -> None:
        if progress.first_token_at is None:
            progress.first_token_at = self._clock()

    def _usage(self, request: CompletionRequest, progress: _Progress) -> TokenUsage:
        """Reported usage, else an estimate (computed once: it tokenizes the whole prompt)."""
        if progress.reported_usage is not None:
            return progress.reported_usage
        if progress.attempts == 0:
            return TokenUsage(source="estimated")
        if progress.estimate is None:
            progress.estimate = self._estimator.estimate(request, progress.relayed)
        return progress.estimate

    def _finished(self, request: CompletionRequest, progress: _Progress, outcome: Outcome) -> StreamFinished:
        usage = self._usage(request, progress)
        cost = self._cost(request, progress, outcome)
        return StreamFinished(
            outcome, progress.finish_reason, usage, cost, progress.deployment, progress.fallback_model
        )

    def _cost(self, request: CompletionRequest, progress: _Progress, outcome: Outcome) -> Cost:
        """Priced from the resolved model; nothing for a call the upstream refused or
        failed before producing anything (pricing.is_charged)."""
        started = progress.started
        table = self._deployment_prices.get(progress.deployment or "", self._prices)
        return table.bill(
            started.model if started else request.model,
            self._usage(request, progress),
            outcome=outcome,
            responded=started is not None or progress.reported_usage is not None,
            at=progress.started_at,
        )

    def _record(
        self,
        request: CompletionRequest,
        progress: _Progress,
        outcome: Outcome,
        status: str,
        trace_id: str | None,
        span_id: str | None,
    ) -> UsageRecord:
        usage = self._usage(request, progress)
        started = progress.started
        cost = self._cost(request, progress, outcome)
        if cost.basis is CostBasis.PRICE_UNKNOWN:
            self._telemetry.count_unpriced(started.model if started else request.model)
        now = self._clock()
        return UsageRecord(
            request_id=request.request_id,
            tenant=request.caller.tenant,
            caller_service=request.caller.service,
            credential_id=request.caller.credential_id or None,
            deployment=progress.deployment,
            fallback_model=progress.fallback_model,
            user_id=request.user_id,
            requested_model=request.model,
            resolved_model=started.model if started else None,
            upstream_response_id=started.upstream_response_id if started else None,
            usage=usage,
            cost=cost,
            outcome=outcome,
            grpc_status=status,
            finish_reason=progress.finish_reason,
            attempts=progress.attempts,
            time_to_first_token_ms=(
                (progress.first_token_at - progress.t0) * 1000.0
                if progress.first_token_at is not None
                else None
            ),
            duration_ms=(now - progress.t0) * 1000.0,
            started_at=progress.started_at,
            trace_id=trace_id,
            span_id=span_id,
            tags=dict(request.tags),
            service_tier=progress.service_tier,
        )
