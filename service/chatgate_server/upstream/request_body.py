"""CompletionRequest → the JSON body of ``POST /chat/completions``.

Built once per request (not per attempt), so retries resend the same bytes.
"""

from __future__ import annotations

from typing import Any

import orjson

from chatgate_server.domain import (
    ChatMessage,
    CompletionRequest,
    ContentPart,
    ImagePart,
    JsonSchemaFormat,
    NamedToolChoice,
    ToolSpec,
)


def build_body(request: CompletionRequest) -> bytes:
    """The request body, streaming with usage included, as JSON bytes."""
    body: dict[str, Any] = {
        "model": request.model,
        "messages": [_message(m) for m in request.messages],
        "stream": True,
        # Without this the upstream never reports usage on a stream.
        "stream_options": {"include_usage": True},
    }
    s = request.sampling
    optional: dict[str, Any] = {
        "temperature": s.temperature,
        "top_p": s.top_p,
        "max_completion_tokens": s.max_completion_tokens,
        "seed": s.seed,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        "parallel_tool_calls": request.parallel_tool_calls,
        # Only deployments that accept these are asked (the router filters on
        # request.features), so the body carries whatever the caller set.
        "reasoning_effort": s.reasoning_effort,
        "verbosity": s.verbosity,
        "service_tier": request.service_tier,
        "prompt_cache_key": request.prompt_cache_key,
        "logprobs": s.logprobs or None,
        "top_logprobs": s.top_logprobs,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if s.stop:
        body["stop"] = list(s.stop)
    if request.tools:
        body["tools"] = [_tool(t) for t in request.tools]
    if request.tool_choice is not None:
        body["tool_choice"] = _tool_choice(request.tool_choice)
    if request.response_format is not None:
        body["response_format"] = _response_format(request.response_format)
    return orjson.dumps(body)


def _message(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role}
    if isinstance(m.content, str):
        out["content"] = m.content
    elif m.content is not None:
        out["content"] = [_part(p) for p in m.content]
    elif m.role != "assistant":
        out["content"] = ""
    else:
        # An assistant turn that only called tools carries content null.
        out["content"] = None
    if m.name:
        out["name"] = m.name
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.refusal:
        out["refusal"] = m.refusal
    return out


def _part(p: ContentPart) -> dict[str, Any]:
    if isinstance(p, ImagePart):
        image: dict[str, Any] = {"url": p.url}
        if p.detail:
            image["detail"] = p.detail
        return {"type": "image_url", "image_url": image}
    return {"type": "text", "text": p.text}


def _tool(t: ToolSpec) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": t.name}
    if t.description:
        fn["description"] = t.description
    if t.parameters is not None:
        fn["parameters"] = t.parameters
    if t.strict is not None:
        fn["strict"] = t.strict
    return {"type": "function", "function": fn}


def _tool_choice(choice: str | NamedToolChoice) -> Any:
    if isinstance(choice, NamedToolChoice):
        return {"type": "function", "function": {"name": choice.name}}
    return choice


def _response_format(fmt: str | JsonSchemaFormat) -> dict[str, Any]:
    if isinstance(fmt, JsonSchemaFormat):
        schema: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema}
        if fmt.description:
            schema["description"] = fmt.description
        if fmt.strict is not None:
            schema["strict"] = fmt.strict
        return {"type": "json_schema", "json_schema": schema}
    return {"type": fmt}
