"""Protobuf ⇄ domain, and request validation.

Validation collects every field violation in one pass so a caller fixes all of them
at once, and it happens before anything reaches the upstream.
"""

from __future__ import annotations

import fnmatch
import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from google.protobuf import struct_pb2

from chatgate.v1 import chat_pb2 as pb
from chatgate_server.completion import OutboundEvent, StreamFinished, StreamStarted
from chatgate_server.domain import (
    MAX_TOP_LOGPROBS,
    Caller,
    ChatMessage,
    CompletionRequest,
    ContentDelta,
    ContentPart,
    ImageDetail,
    ImagePart,
    JsonSchemaFormat,
    LimitKind,
    NamedToolChoice,
    ReasoningEffort,
    RefusalDelta,
    ResponseFormat,
    Role,
    SamplingOptions,
    ServiceTier,
    TextPart,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolSpec,
    Verbosity,
)
from chatgate_server.errors import FieldViolation, InvalidRequest, PermissionDenied

_ROLES: dict[int, Role] = {
    pb.ROLE_SYSTEM: "system",
    pb.ROLE_DEVELOPER: "developer",
    pb.ROLE_USER: "user",
    pb.ROLE_ASSISTANT: "assistant",
    pb.ROLE_TOOL: "tool",
}
_DETAILS: dict[int, ImageDetail] = {
    pb.IMAGE_DETAIL_AUTO: "auto",
    pb.IMAGE_DETAIL_LOW: "low",
    pb.IMAGE_DETAIL_HIGH: "high",
}
_TOOL_MODES: dict[int, ToolChoice] = {
    pb.TOOL_CHOICE_MODE_AUTO: "auto",
    pb.TOOL_CHOICE_MODE_NONE: "none",
    pb.TOOL_CHOICE_MODE_REQUIRED: "required",
}
_REASONING_EFFORTS: dict[int, ReasoningEffort] = {
    pb.REASONING_EFFORT_NONE: "none",
    pb.REASONING_EFFORT_MINIMAL: "minimal",
    pb.REASONING_EFFORT_LOW: "low",
    pb.REASONING_EFFORT_MEDIUM: "medium",
    pb.REASONING_EFFORT_HIGH: "high",
    pb.REASONING_EFFORT_XHIGH: "xhigh",
    pb.REASONING_EFFORT_MAX: "max",
}
_VERBOSITIES: dict[int, Verbosity] = {
    pb.VERBOSITY_LOW: "low",
    pb.VERBOSITY_MEDIUM: "medium",
    pb.VERBOSITY_HIGH: "high",
}
_SERVICE_TIERS: dict[int, ServiceTier] = {
    pb.SERVICE_TIER_AUTO: "auto",
    pb.SERVICE_TIER_DEFAULT: "default",
    pb.SERVICE_TIER_FLEX: "flex",
    pb.SERVICE_TIER_SCALE: "scale",
    pb.SERVICE_TIER_PRIORITY: "priority",
}
_FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
    "content_filter": pb.FINISH_REASON_CONTENT_FILTER,
    "function_call": pb.FINISH_REASON_FUNCTION_CALL,
}
_OUTCOMES = {
    "completed": pb.OUTCOME_COMPLETED,
    "deadline_exceeded": pb.OUTCOME_DEADLINE_EXCEEDED,
    "upstream_error": pb.OUTCOME_UPSTREAM_ERROR,
    "shutdown": pb.OUTCOME_SHUTDOWN,
}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TAGS = 16
MAX_STOP = 4
# Every string that reaches the usage row is bounded: the row's keys are btree-indexed
# (Postgres refuses an index entry over ~2.7 KB, and one such row used to block every
# row behind it). 256 characters is twice OpenAI's longest model names, fine-tunes
# included ("ft:gpt-4o-mini-2024-07-18:my-org:my-suffix:9Ab3dEfG", suffixes ≤ 64).
MAX_MODEL_CHARS = 256
MAX_USER_ID_CHARS = 256
MAX_TAG_KEY_CHARS = 64
MAX_TAG_VALUE_CHARS = 256
# OpenAI refuses a longer prompt_cache_key (string_above_max_length); so does Azure.
MAX_PROMPT_CACHE_KEY_CHARS = 64
# Where a bad number in a Struct is, as a JSON pointer, capped for the violation.
_MAX_POINTER_CHARS = 120


def new_request_id() -> str:
    """Time-ordered (ms, hex) then random: sorts by creation, which keeps indexes local."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Operator limits checked with the rest of validation."""

    max_request_bytes: int = 4 * 1024 * 1024
    # Model names or fnmatch globs ("gpt-4o*"); None allows every model.
    allowed_models: tuple[str, ...] | None = None

    def model_allowed(self, model: str) -> bool:
        return self.allowed_models is None or any(fnmatch.fnmatchcase(model, p) for p in self.allowed_models)


DEFAULT_LIMITS = RequestLimits()


def _check_caller_may_use(caller: Caller, model: str) -> None:
    """A caller whose credential lists models may call only those: PERMISSION_DENIED (the
    request is fine; this caller may not make it), naming the ones it may use."""
    allowed = caller.allowed_models
    if allowed is not None and not any(fnmatch.fnmatchcase(model, p) for p in allowed):
        raise PermissionDenied(
            f"caller {caller.tenant}/{caller.service} may use only these models: {', '.join(allowed)}"
        )


def to_domain(
    msg: pb.CompleteRequest, caller: Caller, limits: RequestLimits = DEFAULT_LIMITS
) -> CompletionRequest:
    """Validate ``msg`` and build the domain request, or raise InvalidRequest."""
    v: list[FieldViolation] = []

    def bad(field: str, description: str) -> None:
        v.append(FieldViolation(field, description))

    size = msg.ByteSize()
    if size > limits.max_request_bytes:
        bad("", f"the request is {size} bytes; the limit is {limits.max_request_bytes}")
    if not msg.model.strip():
        bad("model", "required")
    elif len(msg.model) > MAX_MODEL_CHARS:
        bad("model", f"at most {MAX_MODEL_CHARS} characters")
    elif not limits.model_allowed(msg.model.strip()):
        bad("model", f"not one of the models this service allows: {', '.join(limits.allowed_models or ())}")
    if not msg.user_id.strip():
        bad("user_id", "required: the end user this request is billed to")
    elif len(msg.user_id) > MAX_USER_ID_CHARS:
        bad("user_id", f"at most {MAX_USER_ID_CHARS} characters")
    if msg.request_id and not _REQUEST_ID.fullmatch(msg.request_id):
        bad("request_id", "at most 128 characters of A-Z a-z 0-9 . _ : -")
    if len(msg.tags) > MAX_TAGS:
        bad("tags", f"at most {MAX_TAGS} tags")
    else:  # one violation per tag, so only for a count that is within bounds
        for key, value in msg.tags.items():
            if not key or len(key) > MAX_TAG_KEY_CHARS or len(value) > MAX_TAG_VALUE_CHARS:
                bad(
                    f"tags[{key[:MAX_TAG_KEY_CHARS]}]",
                    f"keys 1-{MAX_TAG_KEY_CHARS} characters, values at most {MAX_TAG_VALUE_CHARS}",
                )
    if not msg.messages:
        bad("messages", "at least one message is required")
    messages = tuple(_message(m, f"messages[{i}]", bad) for i, m in enumerate(msg.messages))
    sampling = _sampling(msg, bad)
    tools = tuple(_tool(t, f"tools[{i}]", bad) for i, t in enumerate(msg.tools))
    tool_choice = _tool_choice(msg, bad)
    response_format = _response_format(msg, bad)
    service_tier = _enum(msg.service_tier, _SERVICE_TIERS, "service_tier", "SERVICE_TIER_", bad)
    prompt_cache_key = _prompt_cache_key(msg.prompt_cache_key, bad)
    if v:
        raise InvalidRequest(v)
    _check_caller_may_use(caller, msg.model.strip())
    return CompletionRequest(
        request_id=msg.request_id or new_request_id(),
        request_id_from_caller=bool(msg.request_id),
        model=msg.model.strip(),
        messages=messages,
        user_id=msg.user_id,
        caller=caller,
        tags=dict(msg.tags),
        sampling=sampling,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=msg.parallel_tool_calls if msg.HasField("parallel_tool_calls") else None,
        response_format=response_format,
        service_tier=service_tier,
        prompt_cache_key=prompt_cache_key,
    )


def _enum(value: int, names: dict[int, Any], field: str, prefix: str, bad: Any) -> Any:
    """An option enum's value (None when unspecified); a violation for a number this
    server does not know (a newer client's value)."""
    if value == 0:
        return None
    name = names.get(value)
    if name is None:
        bad(field, f"must be one of {', '.join(prefix + n.upper() for n in names.values())}")
    return name


def _prompt_cache_key(key: str, bad: Any) -> str | None:
    if not key:
        return None
    if len(key) > MAX_PROMPT_CACHE_KEY_CHARS or not key.isprintable():
        bad("prompt_cache_key", f"at most {MAX_PROMPT_CACHE_KEY_CHARS} printable characters")
    return key


def _message(m: pb.Message, path: str, bad: Any) -> ChatMessage:
    role = _ROLES.get(m.role)
    if role is None:
        bad(
            f"{path}.role", "must be one of ROLE_SYSTEM, ROLE_DEVELOPER, ROLE_USER, ROLE_ASSISTANT, ROLE_TOOL"
        )
    if m.text and m.parts:
        bad(f"{path}", "set either text or parts, not both")
    content: str | tuple[ContentPart, ...] | None
    if m.parts:
        content = tuple(_part(p, f"{path}.parts[{i}]", role, bad) for i, p in enumerate(m.parts))
    else:
        content = m.text if (m.text or role != "assistant") else None
    if role == "tool" and not m.tool_call_id:
        bad(f"{path}.tool_call_id", "required for tool messages")
    if m.tool_calls and role != "assistant":
        bad(f"{path}.tool_calls", "only assistant messages carry tool calls")
    if role == "assistant" and content is None and not m.tool_calls and not m.refusal:
        bad(f"{path}", "an assistant message needs text, parts, tool_calls or a refusal")
    if role in ("system", "developer", "user") and not m.text and not m.parts:
        bad(f"{path}.text", "required")
    calls = []
    for i, c in enumerate(m.tool_calls):
        if not c.id or not c.name:
            bad(f"{path}.tool_calls[{i}]", "id and name are required")
        calls.append(ToolCall(c.id, c.name, c.arguments))
    return ChatMessage(
        role=role or "user",
        content=content,
        name=m.name or None,
        tool_calls=tuple(calls),
        tool_call_id=m.tool_call_id or None,
        refusal=m.refusal or None,
    )


def _part(p: pb.ContentPart, path: str, role: Role | None, bad: Any) -> ContentPart:
    kind = p.WhichOneof("part")
    if kind == "image_url":
        url = p.image_url.url
        if not url.startswith(("https://", "http://", "data:image/")):
            bad(f"{path}.image_url.url", "must be an http(s) URL or a data:image/… URL")
        if role not in ("user", None):
            bad(f"{path}.image_url", "images are allowed in user messages only")
        return ImagePart(url, _DETAILS.get(p.image_url.detail))
    if kind is None:
        bad(path, "set text or image_url")
    return TextPart(p.text)


def _finite_in(value: float, low: float, high: float) -> bool:
    return math.isfinite(value) and low <= value <= high


def _sampling(msg: pb.CompleteRequest, bad: Any) -> SamplingOptions:
    def opt(name: str) -> Any:
        return getattr(msg, name) if msg.HasField(name) else None  # type: ignore[arg-type]

    temperature, top_p = opt("temperature"), opt("top_p")
    presence, frequency = opt("presence_penalty"), opt("frequency_penalty")
    max_tokens = opt("max_completion_tokens")
    if temperature is not None and not _finite_in(temperature, 0, 2):
        bad("temperature", "must be between 0 and 2")
    if top_p is not None and not _finite_in(top_p, 0, 1):
        bad("top_p", "must be between 0 and 1")
    if presence is not None and not _finite_in(presence, -2, 2):
        bad("presence_penalty", "must be between -2 and 2")
    if frequency is not None and not _finite_in(frequency, -2, 2):
        bad("frequency_penalty", "must be between -2 and 2")
    if max_tokens is not None and max_tokens <= 0:
        bad("max_completion_tokens", "must be positive")
    if len(msg.stop) > MAX_STOP:
        bad("stop", f"at most {MAX_STOP} sequences")
    if any(not s for s in msg.stop):
        bad("stop", "sequences must not be empty")
    top_logprobs = opt("top_logprobs")
    if top_logprobs is not None:
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            bad("top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}")
        elif not msg.logprobs:
            bad("top_logprobs", "needs logprobs set to true")
    return SamplingOptions(
        temperature=temperature,
        top_p=top_p,
        max_completion_tokens=max_tokens,
        stop=tuple(msg.stop),
        seed=opt("seed"),
        presence_penalty=presence,
        frequency_penalty=frequency,
        reasoning_effort=_enum(
            msg.reasoning_effort, _REASONING_EFFORTS, "reasoning_effort", "REASONING_EFFORT_", bad
        ),
        verbosity=_enum(msg.verbosity, _VERBOSITIES, "verbosity", "VERBOSITY_", bad),
        logprobs=msg.logprobs,
        top_logprobs=top_logprobs,
    )


def _tool(t: pb.Tool, path: str, bad: Any) -> ToolSpec:
    if not _NAME.fullmatch(t.name):
        bad(f"{path}.name", "1-64 characters of A-Z a-z 0-9 _ -")
    parameters = _json_struct(t.parameters, f"{path}.parameters", bad) if t.HasField("parameters") else None
    return ToolSpec(
        name=t.name,
        description=t.description or None,
        parameters=parameters,
        strict=t.strict if t.HasField("strict") else None,
    )


def _tool_choice(msg: pb.CompleteRequest, bad: Any) -> ToolChoice | None:
    if not msg.HasField("tool_choice"):
        return None
    kind = msg.tool_choice.WhichOneof("choice")
    if kind == "function_name":
        name = msg.tool_choice.function_name
        if name not in {t.name for t in msg.tools}:
            bad("tool_choice.function_name", "must name one of the request's tools")
        return NamedToolChoice(name)
    if kind == "mode":
        return _TOOL_MODES.get(msg.tool_choice.mode)
    return None


def _response_format(msg: pb.CompleteRequest, bad: Any) -> ResponseFormat | None:
    if not msg.HasField("response_format"):
        return None
    kind = msg.response_format.WhichOneof("format")
    if kind == "json_object":
        return "json_object"
    if kind == "json_schema":
        js = msg.response_format.json_schema
        if not _NAME.fullmatch(js.name):
            bad("response_format.json_schema.name", "1-64 characters of A-Z a-z 0-9 _ -")
        if not js.HasField("schema"):
            bad("response_format.json_schema.schema", "required")
        return JsonSchemaFormat(
            name=js.name,
            schema=_json_struct(js.schema, "response_format.json_schema.schema", bad),
            description=js.description or None,
            strict=js.strict if js.HasField("strict") else None,
        )
    if kind == "text":
        return "text"
    return None


def _json_struct(value: struct_pb2.Struct, path: str, bad: Any) -> dict[str, Any]:
    """A Struct as JSON data, or a violation at ``path`` when it holds NaN or ±Infinity
    (protobuf allows them in a double; JSON, and so the upstream, does not)."""
    try:
        return struct_to_dict(value)
    except NotJson as exc:
        bad(path, f"NaN and Infinity are not JSON numbers (at {exc.pointer[:_MAX_POINTER_CHARS]!r})")
        return {}


class NotJson(ValueError):
    """A Struct value with no JSON form; ``pointer`` (RFC 6901) says where."""

    def __init__(self, pointer: str) -> None:
        super().__init__(f"not a JSON value at {pointer!r}")
        self.pointer = pointer


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain JSON data; whole numbers come back as ints. Raises NotJson.

    Struct keeps every number as a double, so ``"minItems": 1`` would otherwise
    reach the upstream as ``1.0``, which strict schema validators reject.
    """
    return {k: _json(v, _pointer("", k)) for k, v in value.fields.items()}


def _json(value: struct_pb2.Value, pointer: str) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise NotJson(pointer or "/")
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    if kind == "struct_value":
        return {k: _json(v, _pointer(pointer, k)) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_json(v, f"{pointer}/{i}") for i, v in enumerate(value.list_value.values)]
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None  # null_value, or no kind at all (protobuf's JSON mapping reads it as null)


def _pointer(parent: str, key: str) -> str:
    return f"{parent}/{key.replace('~', '~0').replace('/', '~1')}"


# --- outbound: domain events → protobuf (the per-token hot path) -----------------------

_Response = pb.CompleteResponse
_Content = pb.ContentDelta
_TokenLogprob = pb.TokenLogprob
_TopLogprob = pb.TopLogprob
_Refusal = pb.RefusalDelta
_ToolCall = pb.ToolCallDelta


def to_proto(event: OutboundEvent) -> pb.CompleteResponse:
    """One outbound event as a CompleteResponse."""
    # Content deltas are nearly every message: test for them first.
    if type(event) is ContentDelta:
        if event.logprobs:
            return _Response(content=_Content(text=event.text, logprobs=_logprobs(event.logprobs)))
        return _Response(content=_Content(text=event.text))
    if type(event) is ToolCallDelta:
        return _Response(
            tool_call=_ToolCall(
                index=event.index,
                id=event.id or "",
                name=event.name or "",
                arguments_fragment=event.arguments,
            )
        )
    if type(event) is RefusalDelta:
        return _Response(refusal=_Refusal(text=event.text))
    if type(event) is StreamStarted:
        return _started(event)
    if type(event) is StreamFinished:
        return _Response(finished=_finished(event))
    raise TypeError(f"not an outbound event: {type(event).__name__}")


def _logprobs(logprobs: tuple[TokenLogprob, ...]) -> list[pb.TokenLogprob]:
    return [
        _TokenLogprob(
            token=t.token,
            logprob=t.logprob,
            token_bytes=t.token_bytes or b"",
            top_logprobs=[
                _TopLogprob(token=a.token, logprob=a.logprob, token_bytes=a.token_bytes or b"") for a in t.top
            ],
        )
        for t in logprobs
    ]


_LIMIT_KINDS = {
    LimitKind.REQUESTS_PER_MINUTE: pb.LIMIT_KIND_REQUESTS_PER_MINUTE,
    LimitKind.TOKENS_PER_MINUTE: pb.LIMIT_KIND_TOKENS_PER_MINUTE,
    LimitKind.TOKENS_PER_DAY: pb.LIMIT_KIND_TOKENS_PER_DAY,
    LimitKind.SPEND_PER_DAY: pb.LIMIT_KIND_SPEND_PER_DAY,
    LimitKind.SPEND_PER_MONTH: pb.LIMIT_KIND_SPEND_PER_MONTH,
    LimitKind.CONCURRENT_STREAMS: pb.LIMIT_KIND_CONCURRENT_STREAMS,
}


def _started(event: StreamStarted) -> pb.CompleteResponse:
    # Filled in place: a message passed to a constructor is copied (the response's
    # Started, and each Allowance in it), which cost more than the rest of this.
    out = _Response()
    started = out.started
    started.SetInParent()  # present even if every field below is empty
    started.request_id = event.request_id
    started.model = event.model
    started.upstream_response_id = event.upstream_response_id
    if event.allowances:
        add = started.allowances.add
        for a in event.allowances:
            item = add(subject=a.subject, kind=_LIMIT_KINDS[a.kind], limit=a.limit, remaining=a.remaining)
            if a.resets_at is not None:
                # Whole microseconds from the epoch, set directly: FromDatetime costs
                # several times more, and a call may carry a dozen allowances.
                seconds, rest = divmod(round(a.resets_at.timestamp() * 1_000_000), 1_000_000)
                item.resets_at.seconds = seconds
                item.resets_at.nanos = rest * 1000
    return out


def _finished(event: StreamFinished) -> pb.Finished:
    u = event.usage
    cost = pb.Cost(price_version=event.cost.price_version)
    if event.cost.usd_micros is not None:
        cost.usd_micros = event.cost.usd_micros
    return pb.Finished(
        finish_reason=_FINISH_REASONS.get(event.finish_reason or "", pb.FINISH_REASON_UNSPECIFIED),
        outcome=_OUTCOMES.get(event.outcome.value, pb.OUTCOME_UNSPECIFIED),
        usage=pb.Usage(
            input_tokens=u.input_tokens,
            output_tokens=u.output_tokens,
            cached_input_tokens=u.cached_input_tokens,
            reasoning_tokens=u.reasoning_tokens,
            total_tokens=u.total_tokens,
            source=pb.USAGE_SOURCE_REPORTED if u.source == "reported" else pb.USAGE_SOURCE_ESTIMATED,
            estimate_encoding=u.estimate_encoding or "",
        ),
        cost=cost,
        deployment=event.deployment or "",
        fallback_model=event.fallback_model or "",
    )
