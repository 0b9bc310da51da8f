"""Estimating token counts when the upstream did not report them.

The upstream reports usage only in the stream's last chunk; a stream the caller
abandoned or the deadline cut never gets it. Then input is counted from the request
and output from the text actually relayed, and the usage is marked estimated with the
name of the method that counted it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from chatgate_server.domain import CompletionRequest, TokenUsage

# Per-message framing overhead and reply priming, from OpenAI's cookbook.
TOKENS_PER_MESSAGE = 3
REPLY_PRIMING_TOKENS = 3


class TokenEstimator(Protocol):
    def estimate(self, request: CompletionRequest, relayed: Sequence[str]) -> TokenUsage:
        """Estimated usage for ``request`` given the output pieces relayed so far."""
        ...


class CharHeuristicEstimator:
    """About four characters per token: a coarse fallback with no tokenizer."""

    encoding = "heuristic-4chars"

    def estimate(self, request: CompletionRequest, relayed: Sequence[str]) -> TokenUsage:
        chars = 0
        for m in request.messages:
            if isinstance(m.content, str):
                chars += len(m.content)
            elif m.content is not None:
                chars += sum(len(getattr(p, "text", "")) for p in m.content)
        input_tokens = chars // 4 + TOKENS_PER_MESSAGE * len(request.messages) + REPLY_PRIMING_TOKENS
        output_tokens = sum(len(piece) for piece in relayed) // 4
        return TokenUsage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            source="estimated",
            estimate_encoding=self.encoding,
        )
