"""The first event carries each limit's headroom as the caller's stubs read it."""

from __future__ import annotations

from datetime import UTC, datetime

from chatgate.v1 import chat_pb2 as pb
from chatgate_server.completion import StreamStarted
from chatgate_server.domain import Allowance, LimitKind
from chatgate_server.rpc.convert import to_proto


def test_allowances_reach_the_started_event_with_kind_limit_remaining_and_reset() -> None:
    resets = datetime(2026, 12, 5, 0, 0, tzinfo=UTC)
    event = StreamStarted(
        "r-1",
        "gpt-4o-mini",
        "chatcmpl-1",
        (
            Allowance("user:acme/u-1", LimitKind.TOKENS_PER_DAY, 100_000, 41_500, resets),
            Allowance("tenant:acme", LimitKind.CONCURRENT_STREAMS, 8, 5, None),
        ),
    )
    started = to_proto(event).started
    tokens, streams = started.allowances
    assert (tokens.subject, tokens.kind, tokens.limit, tokens.remaining) == (
        "user:acme/u-1",
        pb.LIMIT_KIND_TOKENS_PER_DAY,
        100_000,
        41_500,
    )
    assert tokens.resets_at.ToDatetime(tzinfo=UTC) == resets
    assert streams.kind == pb.LIMIT_KIND_CONCURRENT_STREAMS and not streams.HasField("resets_at")


def test_every_limit_kind_has_a_wire_value() -> None:
    for kind in LimitKind:
        started = to_proto(StreamStarted("r", "m", "x", (Allowance("tenant:t", kind, 1, 0, None),))).started
        assert started.allowances[0].kind != pb.LIMIT_KIND_UNSPECIFIED
