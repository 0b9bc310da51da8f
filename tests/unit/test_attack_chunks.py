"""An upstream that reports absurd usage: a negative token count would be refused by the
ledger's CHECK (the row dead-lettered, the call never billed) and would hand tokens back
to a budget; one past any real call would overflow a cost. Both are protocol errors, as
a token count that is not an integer already is."""

from __future__ import annotations

import orjson
import pytest

from chatgate_server.domain import MAX_TOP_LOGPROBS, ContentDelta, UsageReported
from chatgate_server.errors import UpstreamProtocolError
from chatgate_server.upstream.chunks import MAX_TOKEN_COUNT, ChunkDecoder


def usage_chunk(**counts: object) -> str:
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4, **counts}
    return orjson.dumps({"id": "c", "model": "m", "choices": [], "usage": usage}).decode()


@pytest.mark.parametrize(
    "counts",
    [
        {"prompt_tokens": -5},
        {"completion_tokens": -1},
        {"prompt_tokens_details": {"cached_tokens": -3}},
        {"completion_tokens_details": {"reasoning_tokens": -(2**40)}},
        {"prompt_tokens": 2**63 - 1},
        {"completion_tokens": MAX_TOKEN_COUNT + 1},
    ],
)
def test_absurd_token_counts_are_protocol_errors(counts: dict[str, object]) -> None:
    with pytest.raises(UpstreamProtocolError):
        ChunkDecoder().decode(usage_chunk(**counts))


def test_a_large_but_possible_count_is_kept() -> None:
    [_started, reported] = ChunkDecoder().decode(usage_chunk(prompt_tokens=2_000_000))
    assert isinstance(reported, UsageReported) and reported.usage.input_tokens == 2_000_000


def test_more_alternatives_than_anyone_can_ask_for_are_cut_to_twenty() -> None:
    alternatives = [{"token": f"t{i}", "logprob": -1.0, "bytes": None} for i in range(5000)]
    chunk = {
        "id": "c",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "delta": {"content": "hi"},
                "logprobs": {
                    "content": [{"token": "hi", "logprob": -0.1, "bytes": None, "top_logprobs": alternatives}]
                },
            }
        ],
    }
    events = ChunkDecoder().decode(orjson.dumps(chunk).decode())
    [delta] = [e for e in events if isinstance(e, ContentDelta)]
    assert len(delta.logprobs[0].top) == MAX_TOP_LOGPROBS
