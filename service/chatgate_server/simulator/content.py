"""What the simulated model says: text, JSON, a refusal or tool calls, and token counts.

What it answers, in order: a refusal if the scenario asks; tool calls when the request
offers tools (unless ``tool_choice`` is "none", or the last message is a tool result
and the choice is not forced: the model has what it asked for, so a tool loop ends);
JSON that fits the schema of a ``json_schema`` response format, or a small object for
``json_object``; else text.

The text is built from ``WORDS``: each piece ("The", then " quick", " brown", …) is
exactly one token in both o200k_base and cl100k_base, and the regex pre-tokenizer of
both encodings splits the joined text back into those same pieces, so the reported
``completion_tokens`` (one per content chunk) is what tiktoken would count. (Checked
offline with the encodings' rank files: 192 pieces → 192 tokens in each encoding.)

``prompt_tokens`` is only an estimate (about 4 characters per token, plus OpenAI's
cookbook overhead of 3 per message and 3 for the reply priming); it is plausible, not
exact.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson

from .schema_example import example_for

# 64 words; " " + each is a single token in o200k_base and cl100k_base, and so is "The".
# fmt: off
WORDS: tuple[str, ...] = (
    "the", "quick", "brown", "fox", "jumps", "over", "the", "lazy",
    "dog", "and", "then", "runs", "across", "a", "green", "field",
    "to", "find", "a", "small", "river", "where", "it", "drinks",
    "cool", "water", "before", "heading", "back", "home", "through", "the",
    "old", "forest", "under", "a", "bright", "sun", "while", "birds",
    "sing", "in", "tall", "trees", "all", "day", "long", "as",
    "a", "light", "wind", "moves", "the", "leaves", "on", "every",
    "branch", "of", "a", "big", "oak", "near", "the", "hill",
)
# fmt: on
FIRST_WORD = "The"

REFUSAL_PIECES: tuple[str, ...] = (
    "I'm",
    " sorry",
    ",",
    " I",
    " can't",
    " assist",
    " with",
    " that",
    " request",
    ".",
)

# Aliases resolve to a dated snapshot, as the real API reports them in `model`.
MODEL_SNAPSHOTS: Mapping[str, str] = {
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4o": "gpt-4o-2024-08-06",
}

# Tool-call arguments (and JSON answers) arrive in pieces about this long, like the
# recorded streams.
_ARGUMENT_PIECE = 6


def word_piece(i: int) -> str:
    """The i-th content piece of the simulated text (a leading space on all but the first)."""
    if i == 0:
        return FIRST_WORD
    return " " + WORDS[i % len(WORDS)]


def text_of(n: int) -> str:
    """The whole simulated text of ``n`` content chunks."""
    return "".join(word_piece(i) for i in range(n))


def resolve_model(model: str) -> str:
    """The model name the response reports: a known alias's snapshot, else as given."""
    return MODEL_SNAPSHOTS.get(model, model)


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """An approximate prompt token count: ~len/4 per message text, +3 per message, +3.

    Tool definitions add ~len(json)/4. Approximate by design: no tokenizer is loaded.
    """
    total = 3
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            total += 3
            if isinstance(message, dict):
                total += _text_tokens(message.get("content"))
                if "name" in message:
                    total += 1
    tools = body.get("tools")
    if tools:
        total += (len(orjson.dumps(tools)) + 3) // 4
    return total


def _text_tokens(content: Any) -> int:
    if isinstance(content, str):
        return (len(content) + 3) // 4
    if isinstance(content, list):
        # Content parts: count the text ones.
        return sum(
            _text_tokens(part.get("text")) for part in content if isinstance(part, dict) and "text" in part
        )
    return 0


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One simulated tool call; ``fragments`` concatenate to its JSON arguments."""

    index: int
    call_id: str
    name: str
    fragments: tuple[str, ...]

    @property
    def arguments(self) -> str:
        """The complete arguments JSON."""
        return "".join(self.fragments)


@dataclass(frozen=True, slots=True)
class Reply:
    """What the assistant answers: ``words`` text chunks, or ``text`` pieces (JSON), or
    a refusal, or tool calls."""

    words: int = 0
    text: tuple[str, ...] = ()
    refusal: tuple[str, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: str = "stop"
    parallel: bool = False

    @property
    def content_chunks(self) -> int:
        """How many content-carrying chunks the stream has (text, refusal or argument pieces)."""
        if self.tool_calls:
            return sum(len(call.fragments) for call in self.tool_calls)
        if self.refusal:
            return len(self.refusal)
        if self.text:
            return len(self.text)
        return self.words

    @property
    def completion_tokens(self) -> int:
        """Tokens of the reply: exact for text; one per piece (+1 per call) otherwise."""
        return self.content_chunks + len(self.tool_calls)


def plan_reply(body: Mapping[str, Any], *, chunks: int, refusal: bool, parallel_tools: bool) -> Reply:
    """Decide the reply for a request body (the order is in the module docstring).

    Parallel calls (indexes 0 and 1) need the ``parallel_tools`` scenario, at least two
    function tools, ``parallel_tool_calls`` not false and no named ``tool_choice``.
    Text and JSON honour ``max_completion_tokens`` / ``max_tokens`` (finish_reason
    "length", the JSON cut short as the real API cuts it).
    """
    if refusal:
        return Reply(refusal=REFUSAL_PIECES)
    tools = _function_tools(body.get("tools"))
    choice = body.get("tool_choice")
    named = _named_choice(choice)
    # "required" and a named function force a call even after tool results, as the API does.
    forced = choice == "required" or named is not None
    if tools and choice != "none" and (forced or not _answers_tool_results(body)):
        if named is not None:
            chosen = [_find_tool(tools, named)]
        elif parallel_tools and len(tools) >= 2 and body.get("parallel_tool_calls") is not False:
            chosen = tools[:2]
        else:
            chosen = tools[:1]
        calls = tuple(_tool_call(i, tool) for i, tool in enumerate(chosen))
        return Reply(tool_calls=calls, finish_reason="tool_calls", parallel=len(calls) > 1)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        limit = None
    structured = structured_output(body.get("response_format"), chunks)
    if structured is not None:
        pieces = _pieces(structured)
        if limit is not None and limit < len(pieces):
            return Reply(text=pieces[:limit], finish_reason="length")
        return Reply(text=pieces)
    if limit is not None and limit < chunks:
        return Reply(words=limit, finish_reason="length")
    return Reply(words=chunks)


def cut_by_filter(reply: Reply, n: int) -> Reply:
    """The reply as a content filter leaves it: its first ``n`` content pieces, then
    ``finish_reason: "content_filter"``. A tool-call answer becomes ``n`` words of text
    (the simulator's filter judges text only)."""
    if reply.tool_calls:
        return Reply(words=n, finish_reason="content_filter")
    return replace(
        reply,
        words=min(reply.words, n),
        text=reply.text[:n],
        refusal=reply.refusal[:n],
        finish_reason="content_filter",
    )


def structured_output(response_format: Any, chunks: int) -> str | None:
    """The JSON answer a ``response_format`` asks for (None for text).

    ``json_schema``: a value fitting the schema (see ``schema_example``);
    ``json_object``: ``{"answer": <the simulated text>}``.
    """
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return orjson.dumps(example_for(schema)).decode()
    if kind == "json_object":
        return orjson.dumps({"answer": text_of(chunks)}).decode()
    return None


def _answers_tool_results(body: Mapping[str, Any]) -> bool:
    """Whether the last message is a tool result (the model is to answer with it)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return False
    last = messages[-1]
    return isinstance(last, dict) and last.get("role") in ("tool", "function")


def _pieces(text: str) -> tuple[str, ...]:
    return tuple(text[i : i + _ARGUMENT_PIECE] for i in range(0, len(text), _ARGUMENT_PIECE))


def _function_tools(tools: Any) -> list[Mapping[str, Any]]:
    if not isinstance(tools, list):
        return []
    found: list[Mapping[str, Any]] = []
    for tool in tools:
        if isinstance(tool, dict) and tool.get("type", "function") == "function":
            function = tool.get("function")
            if isinstance(function, dict) and isinstance(function.get("name"), str):
                found.append(function)
    return found


def _named_choice(choice: Any) -> str | None:
    if isinstance(choice, dict):
        function = choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return str(function["name"])
    return None


def _find_tool(tools: Sequence[Mapping[str, Any]], name: str) -> Mapping[str, Any]:
    for tool in tools:
        if tool.get("name") == name:
            return tool
    # Unknown name: the real API would reject it; answering with an empty schema keeps
    # the simulator permissive.
    return {"name": name}


def _tool_call(index: int, function: Mapping[str, Any]) -> ToolCall:
    # json.dumps's default separators (", ", ": ") are how the real model writes them.
    arguments = example_for(function.get("parameters"))
    fragments = _pieces(json.dumps(arguments if isinstance(arguments, dict) else {}))
    call_id = f"call_{random.getrandbits(96):024x}"
    return ToolCall(index=index, call_id=call_id, name=str(function["name"]), fragments=fragments)
