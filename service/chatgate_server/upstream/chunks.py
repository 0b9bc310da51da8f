"""Chat-completion chunks (SSE payloads) to domain events.

One :class:`ChunkDecoder` per stream. It is called once per token, so it reads the
parsed JSON with plain dict lookups and builds nothing but the events themselves.
Wrong shapes (a list where an object belongs, text that is not a string, a count
that is not an integer) raise :class:`~chatgate_server.errors.UpstreamProtocolError`
rather than reaching the caller as badly typed events.
"""

from __future__ import annotations

from typing import Any

import orjson

from chatgate_server.domain import (
    MAX_TOP_LOGPROBS,
    ContentDelta,
    Finish,
    FinishReason,
    RefusalDelta,
    ResponseStarted,
    TokenLogprob,
    TokenUsage,
    ToolCallDelta,
    TopLogprob,
    UpstreamEvent,
    UsageReported,
)
from chatgate_server.errors import UpstreamError, UpstreamProtocolError
from chatgate_server.upstream.classify import quotable

__all__ = ["ChunkDecoder"]

_FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "content_filter": "content_filter",
    "function_call": "function_call",
}

# Stands in for a missing or null nested object (function, usage details).
_EMPTY: dict[str, Any] = {}
# The response id and model go to the caller (the started event) and into the usage
# row: upstream text, so bounded. Real ones are under 64 characters.
MAX_ID_CHARS = 256
# The service tier goes into the usage row; real ones are a word ("default", "flex").
MAX_TIER_CHARS = 32
# More tokens than any one call can use (context windows are millions at most); a count
# past it is a lie. Times any price, it stays far inside a bigint of micro-dollars.
MAX_TOKEN_COUNT = 1 << 40


class ChunkDecoder:
    """Turns each SSE payload of one chat-completions stream into domain events.

    Only choice index 0 is relayed: chatgate always asks for one choice (n=1).
    """

    __slots__ = ("_started", "done")

    def __init__(self) -> None:
        self._started = False
        #: True once ``[DONE]`` arrived; later payloads are ignored.
        self.done = False

    def decode(self, payload: str) -> list[UpstreamEvent]:
        """Return the events one payload carries, in order.

        Raises :class:`UpstreamError` for an ``{"error": ...}`` event and
        :class:`UpstreamProtocolError` for a payload that is not a chunk.
        """
        if self.done:
            # A read can hold events after [DONE]; the stream is over, so drop them.
            return []
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            # [DONE] is the one non-JSON payload: checking for it here, once per
            # stream, keeps a comparison off the path of every token. Prefix match
            # as in the openai SDK. `from None`: the JSON error carries the payload.
            if payload.startswith("[DONE]"):
                self.done = True
                return []
            raise UpstreamProtocolError("upstream stream event is not valid JSON") from None
        if type(chunk) is not dict:
            raise UpstreamProtocolError("upstream stream event is not a JSON object")
        error = chunk.get("error")
        if error:
            raise _upstream_error(error)
        choices = chunk.get("choices")
        if type(choices) is not list:
            raise UpstreamProtocolError("upstream stream event is not a chat completion chunk")
        try:
            return self._events(chunk, choices)
        except (AttributeError, TypeError) as exc:
            # A value of the wrong JSON type somewhere in the chunk (e.g. a list
            # where an object belongs). The cause names only types, never values.
            raise UpstreamProtocolError("upstream sent a malformed chat completion chunk") from exc

    def _events(self, chunk: dict[str, Any], choices: list[Any]) -> list[UpstreamEvent]:
        events: list[UpstreamEvent] = []
        if not self._started:
            response_id = chunk.get("id")
            # Some deployments open with an id-less chunk (e.g. Azure's prompt
            # filter results); the response starts at the first chunk with an id.
            if response_id:
                model = chunk.get("model")
                if type(response_id) is not str or type(model) is not str:
                    raise UpstreamProtocolError("upstream chunk has a non-string id or model")
                if len(response_id) > MAX_ID_CHARS or len(model) > MAX_ID_CHARS:
                    raise UpstreamProtocolError("upstream chunk has an oversized id or model")
                self._started = True
                tier = chunk.get("service_tier")
                if type(tier) is not str or len(tier) > MAX_TIER_CHARS:
                    tier = None  # only recorded: a strange one is dropped, never fatal
                events.append(ResponseStarted(response_id, model, tier))
        for choice in choices:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if delta:
                content = delta.get("content")
                if content:
                    logprobs = choice.get("logprobs")
                    if logprobs:
                        # Asked for (CompleteRequest.logprobs): they ride with their text.
                        events.append(ContentDelta(_str(content), _logprobs(logprobs.get("content"))))
                    else:
                        events.append(ContentDelta(_str(content)))
                refusal = delta.get("refusal")
                if refusal:
                    events.append(RefusalDelta(_str(refusal)))
                tool_calls = delta.get("tool_calls")
                if tool_calls:
                    events.extend(_tool_call_delta(call) for call in tool_calls)
            reason = choice.get("finish_reason")
            if reason is not None:
                # A reason newer than this code still ends the choice; its name is lost.
                events.append(Finish(_FINISH_REASONS.get(reason)))
            break
        usage = chunk.get("usage")
        if usage is not None:
            events.append(UsageReported(_usage(usage)))
        return events


def _tool_call_delta(call: Any) -> ToolCallDelta:
    """One fragment of a tool call: id and name come only with a call's first fragment."""
    index = call.get("index")
    if type(index) is not int:
        raise UpstreamProtocolError("upstream tool call fragment has no integer index")
    function = call.get("function") or _EMPTY
    call_id = call.get("id")
    name = function.get("name")
    arguments = function.get("arguments")
    return ToolCallDelta(
        index,
        _str(call_id) if call_id else None,
        _str(name) if name else None,
        _str(arguments) if arguments else "",
    )


def _logprobs(tokens: Any) -> tuple[TokenLogprob, ...]:
    """A choice's ``logprobs.content``: the tokens of this chunk's text (None or missing:
    none; refusal log-probabilities are not relayed)."""
    if not tokens:
        return ()
    return tuple(
        TokenLogprob(
            _str(t.get("token")),
            _number(t.get("logprob")),
            _bytes(t.get("bytes")),
            tuple(
                TopLogprob(_str(a.get("token")), _number(a.get("logprob")), _bytes(a.get("bytes")))
                # Never more than a caller may ask for (OpenAI's bound): more is a lie
                # each caller's event would carry, converted alternative by alternative.
                for a in (t.get("top_logprobs") or ())[:MAX_TOP_LOGPROBS]
            ),
        )
        for t in tokens
    )


def _number(value: Any) -> float:
    if type(value) is float or type(value) is int:
        return float(value)
    raise UpstreamProtocolError("upstream logprob is not a number")


def _bytes(value: Any) -> bytes | None:
    if value is None:
        return None
    if type(value) is list:  # not bytes(5): five zero bytes
        try:
            return bytes(value)  # a list of integers 0-255
        except (TypeError, ValueError):
            pass
    raise UpstreamProtocolError("upstream token bytes are not a list of bytes")


def _str(value: Any) -> str:
    if type(value) is not str:
        raise UpstreamProtocolError("upstream chunk has a non-string text field")
    return value


def _count(value: Any) -> int:
    if type(value) is not int:
        raise UpstreamProtocolError("upstream usage has a non-integer token count")
    if not 0 <= value <= MAX_TOKEN_COUNT:
        # Negative: the ledger's CHECK refuses the row (dead-lettered, never billed) and a
        # budget would get tokens back; past any real call: a cost beyond bigint.
        raise UpstreamProtocolError("upstream usage has a negative or impossible token count")
    return value


def _usage(usage: Any) -> TokenUsage:
    """The include_usage report; detail objects may be missing or null."""
    prompt_details = usage.get("prompt_tokens_details") or _EMPTY
    completion_details = usage.get("completion_tokens_details") or _EMPTY
    return TokenUsage(
        input_tokens=_count(usage.get("prompt_tokens")),
        output_tokens=_count(usage.get("completion_tokens")),
        cached_input_tokens=_count(prompt_details.get("cached_tokens") or 0),
        reasoning_tokens=_count(completion_details.get("reasoning_tokens") or 0),
        source="reported",
    )


def _upstream_error(error: Any) -> UpstreamError:
    """An error event. Only a type and code we know are quoted (classify.quotable): the
    rest is free text of any length that could carry anything."""
    if type(error) is dict:
        kind = quotable(error.get("type"))
        code = quotable(error.get("code"))
    else:
        kind = code = "other"
    return UpstreamError(
        f"upstream reported an error mid-stream (type={kind}, code={code})",
        http_status=None,
    )
