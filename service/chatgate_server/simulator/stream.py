"""The bytes of a reply: SSE chunk events for streams, a JSON body otherwise.

Shaped like the recorded streams in tests/fixtures/openai-streams. Every event is
``prefix + tail``: the prefix (id, object, created, model, system_fingerprint) is built
once per response, and the tails of the text chunks are encoded once at import, so a
text stream costs a few byte concatenations per chunk.
"""

from __future__ import annotations

from typing import Any

import orjson

from .content import FIRST_WORD, WORDS, Reply, ToolCall, text_of

SYSTEM_FINGERPRINT = "fp_simulator"
DONE_EVENT = b"data: [DONE]\n\n"

# (event bytes, whether it carries content: a text, refusal or argument piece).
Event = tuple[bytes, bool]


def _choice_tail(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return b'"choices":[' + orjson.dumps(choice) + b"]}\n\n"


_FIRST_TAIL = _choice_tail({"content": FIRST_WORD})
_WORD_TAILS = tuple(_choice_tail({"content": " " + word}) for word in WORDS)
_ROLE_TAIL = _choice_tail({"role": "assistant", "content": ""})
_FINISH_TAILS = {reason: _choice_tail({}, reason) for reason in ("stop", "length", "tool_calls")}


def event_prefix(completion_id: str, created: int, model: str) -> bytes:
    """The part every chunk of one response shares, up to ``"choices"``."""
    return (
        b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,'
        b'"system_fingerprint":"%s",'
        % (completion_id.encode(), created, orjson.dumps(model), SYSTEM_FINGERPRINT.encode())
    )


def stream_events(reply: Reply, prefix: bytes) -> list[Event]:
    """The events from the role chunk to the finish chunk (no usage, no ``[DONE]``)."""
    if reply.tool_calls:
        events = _tool_events(reply, prefix)
    elif reply.refusal:
        events = [(prefix + _choice_tail({"role": "assistant", "content": None, "refusal": ""}), False)]
        events += [(prefix + _choice_tail({"refusal": piece}), True) for piece in reply.refusal]
    elif reply.text:
        events = [(prefix + _ROLE_TAIL, False)]
        events += [(prefix + _choice_tail({"content": piece}), True) for piece in reply.text]
    else:
        events = [(prefix + _ROLE_TAIL, False)]
        if reply.words:
            events.append((prefix + _FIRST_TAIL, True))
            tails, count = _WORD_TAILS, len(_WORD_TAILS)
            events += [(prefix + tails[i % count], True) for i in range(1, reply.words)]
    finish = _FINISH_TAILS.get(reply.finish_reason) or _choice_tail({}, reply.finish_reason)
    events.append((prefix + finish, False))
    return events


def _tool_events(reply: Reply, prefix: bytes) -> list[Event]:
    events: list[Event] = []
    if reply.parallel:
        # As in the parallel-tools recording: a role chunk of its own, then each call.
        events.append((prefix + _choice_tail({"role": "assistant", "content": None}), False))
    for call in reply.tool_calls:
        head: dict[str, Any] = {"tool_calls": [_call_head(call)]}
        if not reply.parallel:
            # As in the single tool-call recording: role and the call's head in one chunk.
            head = {"role": "assistant", "content": None, **head, "refusal": None}
        events.append((prefix + _choice_tail(head), False))
        events += [
            (
                prefix
                + _choice_tail({"tool_calls": [{"index": call.index, "function": {"arguments": piece}}]}),
                True,
            )
            for piece in call.fragments
        ]
    return events


def _call_head(call: ToolCall) -> dict[str, Any]:
    return {
        "index": call.index,
        "id": call.call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": ""},
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The usage object, with the detail fields the real API fills in."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def usage_event(prefix: bytes, prompt_tokens: int, completion_tokens: int) -> bytes:
    """The include_usage chunk: ``choices: []`` and the usage."""
    return (
        prefix + b'"choices":[],"usage":' + orjson.dumps(usage(prompt_tokens, completion_tokens)) + b"}\n\n"
    )


def completion_body(
    reply: Reply, *, completion_id: str, created: int, model: str, prompt_tokens: int
) -> bytes:
    """A non-streaming ``chat.completion`` JSON body."""
    message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
    if reply.tool_calls:
        message["tool_calls"] = [
            {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in reply.tool_calls
        ]
    elif reply.refusal:
        message["refusal"] = "".join(reply.refusal)
    elif reply.text:
        message["content"] = "".join(reply.text)
    else:
        message["content"] = text_of(reply.words)
    return orjson.dumps(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish_reason}
            ],
            "usage": usage(prompt_tokens, reply.completion_tokens),
        }
    )
