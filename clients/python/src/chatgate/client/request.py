"""Building a ``CompleteRequest`` without spelling out the protobuf by hand.

Everything here returns the generated ``chatgate.v1.chat_pb2`` messages, so a request
built with these helpers can be adjusted field by field, and a hand-built one can be
passed to the clients just the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from google.protobuf import struct_pb2

from chatgate.client.result import ToolCall
from chatgate.v1 import chat_pb2 as pb

ToolChoiceMode = Literal["auto", "none", "required"]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
Verbosity = Literal["low", "medium", "high"]
ServiceTier = Literal["auto", "default", "flex", "scale", "priority"]

_TOOL_CHOICE_MODES: dict[str, pb.ToolChoiceMode.ValueType] = {
    "auto": pb.TOOL_CHOICE_MODE_AUTO,
    "none": pb.TOOL_CHOICE_MODE_NONE,
    "required": pb.TOOL_CHOICE_MODE_REQUIRED,
}


def system(text: str) -> pb.Message:
    """A system message (instructions from the application)."""
    return pb.Message(role=pb.ROLE_SYSTEM, text=text)


def developer(text: str) -> pb.Message:
    """A developer message (newer models prefer it to system)."""
    return pb.Message(role=pb.ROLE_DEVELOPER, text=text)


def user(text: str, *, image_urls: Sequence[str] = ()) -> pb.Message:
    """A user message; with ``image_urls`` (https:// or data: URLs) it becomes multi-part."""
    if not image_urls:
        return pb.Message(role=pb.ROLE_USER, text=text)
    parts = [pb.ContentPart(text=text)] if text else []
    parts += [pb.ContentPart(image_url=pb.ImageUrl(url=url)) for url in image_urls]
    return pb.Message(role=pb.ROLE_USER, parts=parts)


def assistant(text: str = "", *, tool_calls: Sequence[ToolCall | pb.ToolCall] = ()) -> pb.Message:
    """An earlier assistant turn: its text and/or the tool calls it made.

    Pass ``completion.tool_calls`` from ``collect()`` to continue a tool-calling loop.
    """
    calls = [
        c if isinstance(c, pb.ToolCall) else pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments)
        for c in tool_calls
    ]
    return pb.Message(role=pb.ROLE_ASSISTANT, text=text, tool_calls=calls)


def tool_result(tool_call_id: str, text: str) -> pb.Message:
    """The result of the tool call ``tool_call_id``, as the model will read it."""
    return pb.Message(role=pb.ROLE_TOOL, tool_call_id=tool_call_id, text=text)


def function_tool(
    name: str, description: str, parameters: Mapping[str, Any], *, strict: bool | None = None
) -> pb.Tool:
    """A function the model may call; ``parameters`` is its arguments' JSON Schema."""
    tool = pb.Tool(name=name, description=description, parameters=_struct(parameters))
    if strict is not None:
        tool.strict = strict
    return tool


def json_schema_format(
    name: str, schema: Mapping[str, Any], *, description: str = "", strict: bool | None = None
) -> pb.ResponseFormat:
    """Ask for JSON output that matches ``schema``."""
    fmt = pb.JsonSchemaFormat(name=name, description=description, schema=_struct(schema))
    if strict is not None:
        fmt.strict = strict
    return pb.ResponseFormat(json_schema=fmt)


def json_object_format() -> pb.ResponseFormat:
    """Ask for any valid JSON object."""
    return pb.ResponseFormat(json_object=pb.JsonObjectFormat())


def build_request(
    model: str,
    messages: str | Sequence[pb.Message],
    *,
    user_id: str,
    request_id: str = "",
    tags: Mapping[str, str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    max_completion_tokens: int | None = None,
    stop: Sequence[str] = (),
    seed: int | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    tools: Sequence[pb.Tool] = (),
    tool_choice: ToolChoiceMode | pb.ToolChoice | None = None,
    parallel_tool_calls: bool | None = None,
    response_format: pb.ResponseFormat | None = None,
    reasoning_effort: ReasoningEffort | None = None,
    verbosity: Verbosity | None = None,
    service_tier: ServiceTier | None = None,
    prompt_cache_key: str = "",
    logprobs: bool = False,
    top_logprobs: int | None = None,
) -> pb.CompleteRequest:
    """A ``CompleteRequest``; the proto's field comments document every argument.

    ``messages`` may be a plain string: one user message. ``user_id`` is the end user
    billed (required by the server); ``tags`` are cost-allocation labels stored with
    the usage row; ``request_id`` is your idempotency key (generated when empty).
    ``None`` leaves an option unset, so the model's default applies.

    ``reasoning_effort``, ``verbosity``, ``service_tier``, ``prompt_cache_key`` and
    ``logprobs`` (with ``top_logprobs``, 0-20) go only to deployments that accept them;
    when none serving the model does, the call fails with INVALID_ARGUMENT naming the
    option (docs/CALLING.md). Log-probabilities come back in ``ContentDelta.logprobs``.
    """
    request = pb.CompleteRequest(
        model=model,
        messages=[user(messages)] if isinstance(messages, str) else list(messages),
        user_id=user_id,
        request_id=request_id,
        tags=dict(tags or {}),
        stop=list(stop),
        tools=list(tools),
    )
    # Optional scalars are set only when given: proto3 presence means "unset = default".
    if temperature is not None:
        request.temperature = temperature
    if top_p is not None:
        request.top_p = top_p
    if max_completion_tokens is not None:
        request.max_completion_tokens = max_completion_tokens
    if seed is not None:
        request.seed = seed
    if presence_penalty is not None:
        request.presence_penalty = presence_penalty
    if frequency_penalty is not None:
        request.frequency_penalty = frequency_penalty
    if parallel_tool_calls is not None:
        request.parallel_tool_calls = parallel_tool_calls
    if isinstance(tool_choice, str):
        request.tool_choice.mode = _TOOL_CHOICE_MODES[tool_choice]
    elif tool_choice is not None:
        request.tool_choice.CopyFrom(tool_choice)
    if response_format is not None:
        request.response_format.CopyFrom(response_format)
    _set_options(request, reasoning_effort, verbosity, service_tier, prompt_cache_key, logprobs, top_logprobs)
    return request


def _set_options(
    request: pb.CompleteRequest,
    reasoning_effort: ReasoningEffort | None,
    verbosity: Verbosity | None,
    service_tier: ServiceTier | None,
    prompt_cache_key: str,
    logprobs: bool,
    top_logprobs: int | None,
) -> None:
    # The enums' names are the values upper-cased: "xhigh" → REASONING_EFFORT_XHIGH.
    if reasoning_effort is not None:
        request.reasoning_effort = pb.ReasoningEffort.Value(f"REASONING_EFFORT_{reasoning_effort.upper()}")
    if verbosity is not None:
        request.verbosity = pb.Verbosity.Value(f"VERBOSITY_{verbosity.upper()}")
    if service_tier is not None:
        request.service_tier = pb.ServiceTier.Value(f"SERVICE_TIER_{service_tier.upper()}")
    request.prompt_cache_key = prompt_cache_key
    request.logprobs = logprobs
    if top_logprobs is not None:
        request.top_logprobs = top_logprobs


def force_tool(name: str) -> pb.ToolChoice:
    """A tool choice that makes the model call the function ``name``."""
    return pb.ToolChoice(function_name=name)


def _struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct
