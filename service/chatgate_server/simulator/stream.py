"""The bytes of a reply: SSE chunk events for streams, a JSON body otherwise.

Shaped like the recorded streams in tests/fixtures/openai-streams. Every event is
``prefix + tail``: the prefix (id, object, created, model, system_fingerprint) is built
once per response, and the tails of the text chunks are encoded once per style at
import, so a text stream costs a few byte concatenations per chunk.

A ``ChunkStyle`` says how a flavor shapes a choice: OpenAI's plain one, or Azure's,
which carries ``content_filter_results`` (the four categories on content chunks, ``{}``
on the others) and whose stream opens with a chunk of ``prompt_filter_results`` and no
choices.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from .content import FIRST_WORD, WORDS, Reply, ToolCall, text_of, word_piece

SYSTEM_FINGERPRINT = "fp_simulator"
DONE_EVENT = b"data: [DONE]\n\n"

# (event bytes, whether it carries content: a text, refusal or argument piece).
Event = tuple[bytes, bool]


_SAFE = {"filtered": False, "severity": "safe"}
# What Azure's default filter reports on a harmless completion chunk.
SAFE_RESULTS: Mapping[str, Any] = {"hate": _SAFE, "self_harm": _SAFE, "sexual": _SAFE, "violence": _SAFE}
# ... and on a harmless prompt (its prompt filter also looks for jailbreaks).
PROMPT_RESULTS: Mapping[str, Any] = {**SAFE_RESULTS, "jailbreak": {"filtered": False, "detected": False}}
# The simulated verdict when an answer is cut by the filter (content_filter_after).
FILTERED_RESULTS: Mapping[str, Any] = {**SAFE_RESULTS, "violence": {"filtered": True, "severity": "medium"}}


class ChunkStyle:
    """How the choices of one flavor's chunks look; ``azure`` adds the filter annotations."""

    def __init__(self, *, azure: bool) -> None:
        self.azure = azure
        self.first_tail = self.tail({"content": FIRST_WORD}, content=True)
        self.word_tails = tuple(self.tail({"content": " " + word}, content=True) for word in WORDS)
        self.role_tail = self.tail({"role": "assistant", "content": ""})
        self.finish_tails = {reason: self.tail({}, reason) for reason in ("stop", "length", "tool_calls")}
        self.finish_tails["content_filter"] = self.filtered_tail()

    def choice(
        self, base: dict[str, Any], *, content: bool = False, results: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """``base`` with Azure's ``content_filter_results`` first (as Azure orders its keys)."""
        if not self.azure:
            return base
        verdict = results if results is not None else SAFE_RESULTS if content else {}
        return {"content_filter_results": verdict, **base}

    def tail(
        self,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        *,
        content: bool = False,
        results: Mapping[str, Any] | None = None,
        logprobs: Mapping[str, Any] | None = None,
    ) -> bytes:
        """The chunk's ``"choices": [...]}`` and the event's blank line."""
        base = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        choice = self.choice(base, content=content, results=results)
        return b'"choices":[' + orjson.dumps(choice) + b"]}\n\n"

    def filtered_tail(self) -> bytes:
        """The finish chunk of an answer the content filter cut."""
        return self.tail({}, "content_filter", results=FILTERED_RESULTS)


OPENAI_STYLE = ChunkStyle(azure=False)
AZURE_STYLE = ChunkStyle(azure=True)

# Azure's first event: the prompt's filter verdict, no choices, and empty identity fields.
PROMPT_FILTER_EVENT = (
    b"data: "
    + orjson.dumps(
        {
            "choices": [],
            "created": 0,
            "id": "",
            "model": "",
            "object": "",
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": PROMPT_RESULTS}],
        }
    )
    + b"\n\n"
)


def event_prefix(completion_id: str, created: int, model: str, service_tier: str | None = None) -> bytes:
    """The part every chunk of one response shares, up to ``"choices"`` (with the tier
    that serves it when the request asked for one, as OpenAI reports it then)."""
    tier = b'"service_tier":%s,' % orjson.dumps(service_tier) if service_tier else b""
    return (
        b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,%s'
        b'"system_fingerprint":"%s",'
        % (completion_id.encode(), created, orjson.dumps(model), tier, SYSTEM_FINGERPRINT.encode())
    )


# What a request's service_tier is served as: "auto" means the project's default tier.
SERVED_TIERS: Mapping[str, str] = {"auto": "default", "fast": "priority"}


def served_tier(body: Mapping[str, Any]) -> str | None:
    """The tier a request that names one is served in (and says so in its chunks)."""
    tier = body.get("service_tier")
    return SERVED_TIERS.get(tier, tier) if isinstance(tier, str) and tier else None


def token_logprobs(piece: str, position: int, top: int) -> dict[str, Any]:
    """A content chunk's ``logprobs``: its one token with a made-up but steady
    log-probability, and ``top`` alternatives (the token itself first)."""
    logprob = -0.05 * (position % 7 + 1)
    alternatives = [{"token": piece, "logprob": logprob, "bytes": list(piece.encode())}]
    alternatives += [
        {"token": f" alt{k}", "logprob": logprob - k, "bytes": list(f" alt{k}".encode())}
        for k in range(1, top)
    ]
    token = {**alternatives[0], "top_logprobs": alternatives[:top]}
    return {"content": [token], "refusal": None}


def stream_events(
    reply: Reply, prefix: bytes, style: ChunkStyle = OPENAI_STYLE, *, logprobs: int | None = None
) -> list[Event]:
    """The events from the role chunk to the finish chunk (no usage, no ``[DONE]``).

    ``logprobs``: the request asked for log-probabilities with that many alternatives
    (``top_logprobs``, 0 when unset): each text chunk carries its token's."""
    if logprobs is not None and not reply.tool_calls and not reply.refusal:
        return _text_events_with_logprobs(reply, prefix, style, logprobs)
    if reply.tool_calls:
        events = _tool_events(reply, prefix, style)
    elif reply.refusal:
        events = [(prefix + style.tail({"role": "assistant", "content": None, "refusal": ""}), False)]
        events += [(prefix + style.tail({"refusal": piece}, content=True), True) for piece in reply.refusal]
    elif reply.text:
        events = [(prefix + style.role_tail, False)]
        events += [(prefix + style.tail({"content": piece}, content=True), True) for piece in reply.text]
    else:
        events = [(prefix + style.role_tail, False)]
        if reply.words:
            events.append((prefix + style.first_tail, True))
            tails, count = style.word_tails, len(style.word_tails)
            events += [(prefix + tails[i % count], True) for i in range(1, reply.words)]
    finish = style.finish_tails.get(reply.finish_reason) or style.tail({}, reply.finish_reason)
    events.append((prefix + finish, False))
    return events


def _text_events_with_logprobs(reply: Reply, prefix: bytes, style: ChunkStyle, top: int) -> list[Event]:
    pieces = list(reply.text) if reply.text else [word_piece(i) for i in range(reply.words)]
    empty: dict[str, Any] = {"content": [], "refusal": None}
    events: list[Event] = [(prefix + style.tail({"role": "assistant", "content": ""}, logprobs=empty), False)]
    events += [
        (prefix + style.tail({"content": piece}, content=True, logprobs=token_logprobs(piece, i, top)), True)
        for i, piece in enumerate(pieces)
    ]
    finish = style.finish_tails.get(reply.finish_reason) or style.tail({}, reply.finish_reason)
    events.append((prefix + finish, False))
    return events


def _tool_events(reply: Reply, prefix: bytes, style: ChunkStyle) -> list[Event]:
    events: list[Event] = []
    if reply.parallel:
        # As in the parallel-tools recording: a role chunk of its own, then each call.
        events.append((prefix + style.tail({"role": "assistant", "content": None}), False))
    for call in reply.tool_calls:
        head: dict[str, Any] = {"tool_calls": [_call_head(call)]}
        if not reply.parallel:
            # As in the single tool-call recording: role and the call's head in one chunk.
            head = {"role": "assistant", "content": None, **head, "refusal": None}
        events.append((prefix + style.tail(head), False))
        events += [
            (
                prefix
                + style.tail(
                    {"tool_calls": [{"index": call.index, "function": {"arguments": piece}}]}, content=True
                ),
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
    reply: Reply,
    *,
    completion_id: str,
    created: int,
    model: str,
    prompt_tokens: int,
    style: ChunkStyle = OPENAI_STYLE,
) -> bytes:
    """A non-streaming ``chat.completion`` JSON body (Azure's carries the filter verdicts)."""
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
    filtered = reply.finish_reason == "content_filter"
    choice = style.choice(
        {"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish_reason},
        content=True,
        results=FILTERED_RESULTS if filtered else None,
    )
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [choice],
        "usage": usage(prompt_tokens, reply.completion_tokens),
    }
    if style.azure:
        body["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": PROMPT_RESULTS}]
    return orjson.dumps(body)
