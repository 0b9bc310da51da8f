"""Merging the deltas that arrived together: same text, same order, fewer messages."""

from __future__ import annotations

import random

from chatgate_server.domain import (
    ContentDelta,
    Finish,
    RefusalDelta,
    ResponseStarted,
    TokenLogprob,
    TokenUsage,
    ToolCallDelta,
    UpstreamEvent,
    UsageReported,
)
from chatgate_server.upstream.coalesce import coalesce


def test_a_run_of_content_deltas_becomes_one() -> None:
    events: list[UpstreamEvent] = [ContentDelta("Hel"), ContentDelta("lo"), ContentDelta(", world")]
    assert coalesce(events) == [ContentDelta("Hello, world")]


def test_other_events_keep_their_place_and_split_runs() -> None:
    started = ResponseStarted("chatcmpl-1", "gpt-4o-mini")
    finish = Finish("stop")
    usage = UsageReported(TokenUsage(input_tokens=3, output_tokens=4))
    events: list[UpstreamEvent] = [
        started,
        ContentDelta("a"),
        ContentDelta("b"),
        RefusalDelta("no"),
        RefusalDelta("pe"),
        ContentDelta("c"),
        finish,
        usage,
    ]
    assert coalesce(events) == [
        started,
        ContentDelta("ab"),
        RefusalDelta("nope"),
        ContentDelta("c"),
        finish,
        usage,
    ]


def test_fragments_of_one_tool_call_merge_but_a_new_call_does_not() -> None:
    events: list[UpstreamEvent] = [
        ToolCallDelta(0, "call_a", "get_weather", ""),
        ToolCallDelta(0, None, None, '{"city":'),
        ToolCallDelta(0, None, None, '"Paris"}'),
        ToolCallDelta(1, "call_b", "get_time", '{"tz"'),  # the next call starts: kept apart
        ToolCallDelta(1, None, None, ':"CET"}'),
        ToolCallDelta(0, None, None, ""),  # another index interleaved: kept apart
    ]
    assert coalesce(events) == [
        ToolCallDelta(0, "call_a", "get_weather", '{"city":"Paris"}'),
        ToolCallDelta(1, "call_b", "get_time", '{"tz":"CET"}'),
        ToolCallDelta(0, None, None, ""),
    ]


def test_a_fragment_that_names_its_call_again_is_not_folded_in() -> None:
    # An upstream that repeats id/name on a later fragment: the caller sees it as sent.
    events: list[UpstreamEvent] = [
        ToolCallDelta(0, "call_a", "f", "{"),
        ToolCallDelta(0, "call_a", "f", "}"),
    ]
    assert coalesce(events) == events


def test_a_single_event_or_none_is_returned_as_is() -> None:
    one: list[UpstreamEvent] = [ContentDelta("x")]
    assert coalesce(one) is one
    assert coalesce([]) == []


def test_what_a_caller_assembles_never_changes() -> None:
    """Property: for any sequence, concatenating each kind's text gives the same result,
    the non-delta events are the same in the same order, and nothing grows."""
    rng = random.Random(7)

    def make() -> UpstreamEvent:
        match rng.randrange(5):
            case 0:
                return ContentDelta(rng.choice(["a", "bc", "é", "🙂", " "]))
            case 1:
                return RefusalDelta(rng.choice(["r", "st"]))
            case 2:
                return ToolCallDelta(rng.randrange(2), None, None, rng.choice(["{", "}", "1"]))
            case 3:
                return ToolCallDelta(rng.randrange(2), "id", "fn", "")
            case _:
                return Finish("stop")

    for _ in range(500):
        events = [make() for _ in range(rng.randrange(0, 30))]
        merged = coalesce(events)
        assert len(merged) <= len(events)
        assert _assembled(merged) == _assembled(events)


def _assembled(events: list[UpstreamEvent]) -> tuple[str, str, dict[int, str], list[UpstreamEvent]]:
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    refusal = "".join(e.text for e in events if isinstance(e, RefusalDelta))
    calls: dict[int, str] = {}
    for e in events:
        if isinstance(e, ToolCallDelta):
            calls[e.index] = calls.get(e.index, "") + (e.id or "") + (e.name or "") + e.arguments
    others: list[UpstreamEvent] = [
        e for e in events if not isinstance(e, ContentDelta | RefusalDelta | ToolCallDelta)
    ]
    return content, refusal, calls, others


def test_exactly_two_deltas_become_one() -> None:
    # The smallest batch that can merge: a caller gets one message, not two.
    events: list[UpstreamEvent] = [ContentDelta("Hel"), ContentDelta("lo")]
    assert coalesce(events) == [ContentDelta("Hello")]


def test_merged_content_keeps_every_token_log_probability_in_order() -> None:
    a, b, c = TokenLogprob("Hel", -0.1), TokenLogprob("lo", -0.2), TokenLogprob("!", -0.3)
    events: list[UpstreamEvent] = [
        ContentDelta("Hel", (a,)),
        ContentDelta("lo", (b,)),
        ContentDelta("!", (c,)),
    ]
    assert coalesce(events) == [ContentDelta("Hello!", (a, b, c))]
    assert coalesce([ContentDelta("a"), ContentDelta("b")]) == [ContentDelta("ab")]
