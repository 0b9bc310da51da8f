"""Typed events of a completion stream, decoded from ``CompleteResponse``.

A stream is one :class:`Started`, then :class:`ContentDelta`, :class:`RefusalDelta` and
:class:`ToolCallDelta` events in the order the model produced them, then exactly one
:class:`Finished`. Events are plain frozen dataclasses, so ``match`` works on them::

    match event:
        case ContentDelta(text=text):
            print(text, end="")
        case Finished(usage=usage):
            print(usage.total_tokens)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime

from chatgate.v1 import chat_pb2 as pb


class FinishReason(enum.StrEnum):
    """Why the model stopped (``UNSPECIFIED`` when the stream was cut)."""

    UNSPECIFIED = "unspecified"
    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    CONTENT_FILTER = "content_filter"
    FUNCTION_CALL = "function_call"


class Outcome(enum.StrEnum):
    """How the stream ended from chatgate's side."""

    UNSPECIFIED = "unspecified"
    COMPLETED = "completed"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UPSTREAM_ERROR = "upstream_error"
    SHUTDOWN = "shutdown"


class UsageSource(enum.StrEnum):
    """Where token counts came from: the upstream's report, or chatgate's estimate."""

    UNSPECIFIED = "unspecified"
    REPORTED = "reported"
    ESTIMATED = "estimated"


class LimitKind(enum.StrEnum):
    """What a limit counts; the values are the names chatgate's operators use."""

    UNSPECIFIED = "unspecified"
    REQUESTS_PER_MINUTE = "requests_per_minute"
    TOKENS_PER_MINUTE = "tokens_per_minute"
    TOKENS_PER_DAY = "tokens_per_day"  # a UTC day
    SPEND_PER_DAY = "spend_per_day"  # micro-dollars, a UTC day
    SPEND_PER_MONTH = "spend_per_month"  # micro-dollars, a calendar month (UTC)
    CONCURRENT_STREAMS = "concurrent_streams"


# Explicit tables rather than name mangling: a value added to the contract later
# decodes as UNSPECIFIED instead of raising in the middle of a stream.
_FINISH_REASONS = {
    pb.FINISH_REASON_STOP: FinishReason.STOP,
    pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    pb.FINISH_REASON_TOOL_CALLS: FinishReason.TOOL_CALLS,
    pb.FINISH_REASON_CONTENT_FILTER: FinishReason.CONTENT_FILTER,
    pb.FINISH_REASON_FUNCTION_CALL: FinishReason.FUNCTION_CALL,
}
_OUTCOMES = {
    pb.OUTCOME_COMPLETED: Outcome.COMPLETED,
    pb.OUTCOME_DEADLINE_EXCEEDED: Outcome.DEADLINE_EXCEEDED,
    pb.OUTCOME_UPSTREAM_ERROR: Outcome.UPSTREAM_ERROR,
    pb.OUTCOME_SHUTDOWN: Outcome.SHUTDOWN,
}
_USAGE_SOURCES = {
    pb.USAGE_SOURCE_REPORTED: UsageSource.REPORTED,
    pb.USAGE_SOURCE_ESTIMATED: UsageSource.ESTIMATED,
}
_LIMIT_KINDS = {
    pb.LIMIT_KIND_REQUESTS_PER_MINUTE: LimitKind.REQUESTS_PER_MINUTE,
    pb.LIMIT_KIND_TOKENS_PER_MINUTE: LimitKind.TOKENS_PER_MINUTE,
    pb.LIMIT_KIND_TOKENS_PER_DAY: LimitKind.TOKENS_PER_DAY,
    pb.LIMIT_KIND_SPEND_PER_DAY: LimitKind.SPEND_PER_DAY,
    pb.LIMIT_KIND_SPEND_PER_MONTH: LimitKind.SPEND_PER_MONTH,
    pb.LIMIT_KIND_CONCURRENT_STREAMS: LimitKind.CONCURRENT_STREAMS,
}


@dataclass(frozen=True, slots=True)
class Allowance:
    """What one limit that applies to the call still allows, this call's reservation
    already taken: the gRPC form of OpenAI's ``x-ratelimit-*`` headers.

    ``subject`` is whose limit (``tenant:acme``, ``caller:acme/billing``,
    ``user:acme/u-42``, with ``/model:gpt-4o`` for a per-model limit); ``limit`` and
    ``remaining`` are in the kind's unit (requests, tokens, micro-dollars, streams);
    ``resets_at`` is when the limit is whole again (an aware UTC datetime), None for
    concurrent streams.
    """

    subject: str
    kind: LimitKind
    limit: int
    remaining: int
    resets_at: datetime | None


@dataclass(frozen=True, slots=True)
class Started:
    """First event: the request id (yours or generated), the model that answers, and
    what the limits that apply still allow — one per kind, the tightest of a kind
    (empty when none applies)."""

    request_id: str
    model: str
    upstream_response_id: str
    allowances: tuple[Allowance, ...] = ()


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """One of the likeliest tokens at a position of the answer."""

    token: str
    logprob: float
    token_bytes: bytes = b""


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One token of the answer and its natural-log probability (requests with
    ``logprobs``). ``token_bytes`` is its UTF-8 bytes, which may be part of a character
    (b"" when the upstream gave none); ``top_logprobs`` the likeliest tokens there."""

    token: str
    logprob: float
    token_bytes: bytes = b""
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class ContentDelta:
    """A piece of the answer's text; concatenate them in order. ``logprobs``: its
    tokens' log-probabilities when the request asked for them (else empty)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class RefusalDelta:
    """A piece of a refusal (the model declined); concatenate them in order."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of tool call ``index``: ``id`` and ``name`` come on its first piece only."""

    index: int
    id: str
    name: str
    arguments_fragment: str


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens used. ``cached_input_tokens`` is part of ``input_tokens``; reasoning of output."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    reasoning_tokens: int
    total_tokens: int
    source: UsageSource
    estimate_encoding: str


@dataclass(frozen=True, slots=True)
class Cost:
    """What the request cost: ``usd_micros`` is None when the model has no price."""

    usd_micros: int | None
    price_version: str


@dataclass(frozen=True, slots=True)
class Finished:
    """Last event: why the model stopped, how the stream ended, usage and cost."""

    finish_reason: FinishReason
    outcome: Outcome
    usage: Usage
    cost: Cost
    deployment: str = ""
    """The upstream deployment that served the stream ("" when none was reached)."""
    fallback_model: str = ""
    """The route's fallback model that served the stream ("" when the model asked for did)."""


Event = Started | ContentDelta | RefusalDelta | ToolCallDelta | Finished
"""One event of a completion stream."""


def event_from_proto(message: pb.CompleteResponse) -> Event | None:
    """The typed event in ``message``, or None for an event kind this client does not know.

    Unknown kinds (added to the contract after this client was built) are skipped by
    the clients, so an older client keeps working against a newer server.
    """
    kind = message.WhichOneof("event")
    if kind == "content":
        content = message.content
        if content.logprobs:
            return ContentDelta(content.text, tuple(_token_logprob(t) for t in content.logprobs))
        return ContentDelta(content.text)
    if kind == "tool_call":
        d = message.tool_call
        return ToolCallDelta(d.index, d.id, d.name, d.arguments_fragment)
    if kind == "refusal":
        return RefusalDelta(message.refusal.text)
    if kind == "started":
        s = message.started
        allowances = tuple(_allowance(a) for a in s.allowances)
        return Started(s.request_id, s.model, s.upstream_response_id, allowances)
    if kind == "finished":
        return _finished(message.finished)
    return None


def _token_logprob(t: pb.TokenLogprob) -> TokenLogprob:
    top = tuple(TopLogprob(a.token, a.logprob, a.token_bytes) for a in t.top_logprobs)
    return TokenLogprob(t.token, t.logprob, t.token_bytes, top)


def _finished(f: pb.Finished) -> Finished:
    u = f.usage
    usage = Usage(
        input_tokens=u.input_tokens,
        output_tokens=u.output_tokens,
        cached_input_tokens=u.cached_input_tokens,
        reasoning_tokens=u.reasoning_tokens,
        total_tokens=u.total_tokens,
        source=_USAGE_SOURCES.get(u.source, UsageSource.UNSPECIFIED),
        estimate_encoding=u.estimate_encoding,
    )
    cost = Cost(
        usd_micros=f.cost.usd_micros if f.cost.HasField("usd_micros") else None,
        price_version=f.cost.price_version,
    )
    return Finished(
        finish_reason=_FINISH_REASONS.get(f.finish_reason, FinishReason.UNSPECIFIED),
        outcome=_OUTCOMES.get(f.outcome, Outcome.UNSPECIFIED),
        usage=usage,
        cost=cost,
        deployment=f.deployment,
        fallback_model=f.fallback_model,
    )


def _allowance(a: pb.Allowance) -> Allowance:
    return Allowance(
        subject=a.subject,
        kind=_LIMIT_KINDS.get(a.kind, LimitKind.UNSPECIFIED),
        limit=a.limit,
        remaining=a.remaining,
        resets_at=a.resets_at.ToDatetime(tzinfo=UTC) if a.HasField("resets_at") else None,
    )
