"""What the simulated model says: text, a refusal or tool calls, and token counts.

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
from dataclasses import dataclass
from typing import Any

import orjson

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

# Tool-call arguments arrive in pieces about this long, like the recorded streams.
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
    """What the assistant answers: ``words`` text chunks, or a refusal, or tool calls."""

    words: int = 0
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
        return self.words

    @property
    def completion_tokens(self) -> int:
        """Tokens of the reply: exact for text; one per piece (+1 per call) otherwise."""
        return self.content_chunks + len(self.tool_calls)


def plan_reply(body: Mapping[str, Any], *, chunks: int, refusal: bool, parallel_tools: bool) -> Reply:
    """Decide the reply for a request body.

    Refusal wins over tools; tools (unless ``tool_choice`` is "none") win over text.
    Parallel calls (indexes 0 and 1) need the ``parallel_tools`` scenario, at least two
    function tools, ``parallel_tool_calls`` not false and no named ``tool_choice``.
    Text honours ``max_completion_tokens`` / ``max_tokens`` (finish_reason "length").
    """
    if refusal:
        return Reply(refusal=REFUSAL_PIECES)
    tools = _function_tools(body.get("tools"))
    choice = body.get("tool_choice")
    if tools and choice != "none":
        named = _named_choice(choice)
        if named is not None:
            chosen = [_find_tool(tools, named)]
        elif parallel_tools and len(tools) >= 2 and body.get("parallel_tool_calls") is not False:
            chosen = tools[:2]
        else:
            chosen = tools[:1]
        calls = tuple(_tool_call(i, tool) for i, tool in enumerate(chosen))
        return Reply(tool_calls=calls, finish_reason="tool_calls", parallel=len(calls) > 1)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < chunks:
        return Reply(words=limit, finish_reason="length")
    return Reply(words=chunks)


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
    arguments = json.dumps(_example_arguments(function.get("parameters")))
    fragments = tuple(arguments[i : i + _ARGUMENT_PIECE] for i in range(0, len(arguments), _ARGUMENT_PIECE))
    call_id = f"call_{random.getrandbits(96):024x}"
    return ToolCall(index=index, call_id=call_id, name=str(function["name"]), fragments=fragments)


def _example_arguments(schema: Any) -> dict[str, Any]:
    """Arguments that fit a JSON schema's required (else all) properties, deterministically."""
    if not isinstance(schema, dict):
        return {}
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return {}
    required = schema.get("required")
    names = [n for n in required if n in properties] if isinstance(required, list) else list(properties)
    return {name: _example_value(properties[name]) for name in names}


def _example_value(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return "Paris"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    values: dict[Any, Any] = {
        "integer": 1,
        "number": 1.5,
        "boolean": True,
        "array": [],
        "object": {},
        "null": None,
    }
    return values.get(kind, "Paris")
