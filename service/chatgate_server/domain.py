"""The domain: plain data for one completion request and what happens to it.

Nothing here knows about gRPC, HTTP or SQL. ``rpc/`` converts protobuf messages to
these types, ``upstream/`` turns them into an OpenAI request and turns the response
back into :data:`UpstreamEvent` values, and ``usage/`` stores :class:`UsageRecord`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

Role = Literal["system", "developer", "user", "assistant", "tool"]
ImageDetail = Literal["auto", "low", "high"]
FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]
UsageSource = Literal["reported", "estimated"]
# The values are OpenAI's (openai-python's ReasoningEffort and chat completion params).
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
Verbosity = Literal["low", "medium", "high"]
ServiceTier = Literal["auto", "default", "flex", "scale", "priority"]
Feature = Literal["reasoning_effort", "verbosity", "service_tier", "prompt_cache_key", "logprobs"]
"""A request option that only some deployments accept (chatgate.toml ``accepts``)."""
FEATURES: tuple[Feature, ...] = (
    "reasoning_effort",
    "verbosity",
    "service_tier",
    "prompt_cache_key",
    "logprobs",
)


# --- the request -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextPart:
    """A text piece of a multi-part message."""

    text: str


@dataclass(frozen=True, slots=True)
class ImagePart:
    """An image piece of a multi-part message: an https: or data: URL."""

    url: str
    detail: ImageDetail | None = None


ContentPart = TextPart | ImagePart


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call the model made in an earlier assistant turn."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One turn of the conversation.

    ``content`` is a plain string, a tuple of parts, or None (an assistant turn that
    only called tools).
    """

    role: Role
    content: str | tuple[ContentPart, ...] | None = None
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    refusal: str | None = None


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the model may call; ``parameters`` is its JSON Schema."""

    name: str
    description: str | None = None
    parameters: Mapping[str, Any] | None = None
    strict: bool | None = None


@dataclass(frozen=True, slots=True)
class NamedToolChoice:
    """Force the model to call this function."""

    name: str


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


@dataclass(frozen=True, slots=True)
class JsonSchemaFormat:
    """Ask for JSON that matches ``schema``."""

    name: str
    schema: Mapping[str, Any]
    description: str | None = None
    strict: bool | None = None


ResponseFormat = Literal["text", "json_object"] | JsonSchemaFormat


class LimitKind(enum.StrEnum):
    """What a limit counts (limits/); the values are the names operators type."""

    REQUESTS_PER_MINUTE = "requests_per_minute"
    TOKENS_PER_MINUTE = "tokens_per_minute"
    TOKENS_PER_DAY = "tokens_per_day"
    SPEND_PER_DAY = "spend_per_day"  # integer micro-dollars
    SPEND_PER_MONTH = "spend_per_month"  # integer micro-dollars, calendar month (UTC)
    CONCURRENT_STREAMS = "concurrent_streams"


@dataclass(frozen=True, slots=True)
class Allowance:
    """What one limit still allows after a call was admitted (its reservation taken);
    sent to the caller in the first event."""

    subject: str  # "tenant:acme", "caller:billing", "user:acme/u-42" (+ "/model:…")
    kind: LimitKind
    limit: int
    remaining: int
    resets_at: datetime | None  # None for concurrent streams


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """Sampling knobs; None means "the upstream's default"."""

    temperature: float | None = None
    top_p: float | None = None
    max_completion_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    reasoning_effort: ReasoningEffort | None = None
    verbosity: Verbosity | None = None
    logprobs: bool = False
    """Return each answer token's log-probability (ContentDelta.logprobs)."""
    top_logprobs: int | None = None
    """With logprobs: how many of the likeliest tokens per position (0-20)."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the tenant decides billing scope; the service is the caller.

    ``credential_id`` is the public id of the token or certificate mapping that
    proved it (never the secret); ``roles`` what it may do beyond calling."""

    tenant: str
    service: str
    roles: frozenset[str] = frozenset()
    credential_id: str = ""
    # None: every model the service allows; otherwise only these (names or globs).
    allowed_models: tuple[str, ...] | None = None


ANONYMOUS_CALLER = Caller(tenant="default", service="unknown")


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A validated completion request, ready for the upstream."""

    request_id: str
    model: str
    messages: tuple[ChatMessage, ...]
    user_id: str
    caller: Caller = ANONYMOUS_CALLER
    tags: Mapping[str, str] = field(default_factory=dict)
    sampling: SamplingOptions = SamplingOptions()
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # True when the caller supplied request_id (an idempotency key); False when chatgate
    # generated it. Only supplied ids can be reused, so only they are checked at admission.
    request_id_from_caller: bool = False
    service_tier: ServiceTier | None = None
    prompt_cache_key: str | None = None

    @property
    def features(self) -> frozenset[Feature]:
        """The options this request sets that only some deployments accept: the router
        sends it only to deployments that accept every one of them."""
        s = self.sampling
        if (
            s.reasoning_effort is None
            and s.verbosity is None
            and not s.logprobs
            and self.service_tier is None
            and self.prompt_cache_key is None
        ):
            return _NO_FEATURES  # nearly every call: nothing to filter on
        used: list[Feature] = []
        if s.reasoning_effort is not None:
            used.append("reasoning_effort")
        if s.verbosity is not None:
            used.append("verbosity")
        if self.service_tier is not None:
            used.append("service_tier")
        if self.prompt_cache_key is not None:
            used.append("prompt_cache_key")
        if s.logprobs or s.top_logprobs is not None:
            used.append("logprobs")
        return frozenset(used)


_NO_FEATURES: frozenset[Feature] = frozenset()


# --- what the upstream sends back ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Token counts. Cached input is part of input; reasoning is part of output."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    source: UsageSource = "reported"
    # For estimated usage: the tokenizer encoding that counted it.
    estimate_encoding: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class ResponseStarted:
    """The first chunk arrived: the upstream's response id and resolved model (and the
    processing tier that serves it, when the upstream says)."""

    response_id: str
    model: str
    service_tier: str | None = None


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """One of the likeliest tokens at a position of the answer."""

    token: str
    logprob: float
    token_bytes: bytes | None = None


# The most alternatives per token a caller may ask for (top_logprobs; OpenAI's bound):
# requests past it are refused, and an upstream's list is cut to it.
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One answer token and how likely the model found it (with logprobs asked for)."""

    token: str
    logprob: float
    token_bytes: bytes | None = None
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class ContentDelta:
    """A piece of answer text; ``logprobs``: its tokens' log-probabilities, when asked for."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class RefusalDelta:
    """A piece of refusal text."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a tool call; id and name come only on a call's first piece."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True, slots=True)
class Finish:
    """The model stopped, for this reason."""

    reason: FinishReason | None


@dataclass(frozen=True, slots=True)
class UsageReported:
    """The upstream reported usage (the include_usage chunk)."""

    usage: TokenUsage


UpstreamEvent = ResponseStarted | ContentDelta | RefusalDelta | ToolCallDelta | Finish | UsageReported


# --- the result -------------------------------------------------------------------------


class Outcome(enum.StrEnum):
    """How a request ended, from chatgate's side. Stored in the usage row."""

    COMPLETED = "completed"
    CANCELLED = "cancelled"  # the caller left
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UPSTREAM_ERROR = "upstream_error"
    REJECTED = "rejected"  # never reached the upstream: invalid, breaker, quota, auth
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal_error"


class CostBasis(enum.StrEnum):
    """Why a row's cost is what it is. Stored in the usage row (``cost_basis``)."""

    PRICED = "priced"  # tokens × the price row named by price_version
    NOT_CHARGED = "not_charged"  # the upstream refused or failed before producing anything
    PRICE_UNKNOWN = "price_unknown"  # no price row for the model: cost NULL, never a guess


@dataclass(frozen=True, slots=True)
class Cost:
    """What a request cost: integer micro-dollars (None when the model has no price)."""

    usd_micros: int | None
    price_version: str
    # None only for records made before chatgate recorded it (old spool lines).
    basis: CostBasis | None = None


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One usage row: who, what, how much, how it went, when. Keyed by request_id."""

    request_id: str
    tenant: str
    caller_service: str
    user_id: str
    requested_model: str
    resolved_model: str | None
    upstream_response_id: str | None
    usage: TokenUsage
    cost: Cost
    outcome: Outcome
    grpc_status: str  # the status code's name, e.g. "OK", "DEADLINE_EXCEEDED"
    finish_reason: FinishReason | None
    attempts: int
    time_to_first_token_ms: float | None
    duration_ms: float
    started_at: datetime
    trace_id: str | None = None
    # The request's server span, so the ledger's write span can link to it.
    span_id: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    # Hash of the request's content when the caller supplied the request id (see
    # usage/admission.py): tells a retry of the same request from a reuse of its id.
    request_fingerprint: str | None = None
    # The public id of the credential that proved the caller (auth/): which token or
    # certificate mapping spent this, never the secret. None with CHATGATE_AUTH=off.
    credential_id: str | None = None
    # The deployment (chatgate.toml) of the call's last attempt; None when none was made.
    deployment: str | None = None
    # The processing tier the upstream reports it served the call in (the chunks'
    # service_tier: "default", "flex", "priority"…); None when it said nothing.
    service_tier: str | None = None
    # The route's fallback model (chatgate.toml ``fallback``) when the call's last attempt
    # went to it; None when it went to the model asked for.
    fallback_model: str | None = None
