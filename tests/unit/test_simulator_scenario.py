"""The simulator's pure parts: scenario grammar, reply planning, HTTP parsing."""

from __future__ import annotations

import json

import pytest

from chatgate_server.simulator.content import (
    WORDS,
    estimate_prompt_tokens,
    plan_reply,
    resolve_model,
    text_of,
    word_piece,
)
from chatgate_server.simulator.scenario import Scenario, ScenarioError, parse_scenario, split_model
from chatgate_server.simulator.wire import HttpError, RequestParser, frame_chunk


def test_parse_keys_and_flags() -> None:
    scenario = parse_scenario(" status=500 , times=2,should_retry=false,no_done ")
    assert scenario.status == 500
    assert scenario.times == 2
    assert scenario.should_retry is False
    assert scenario.no_done is True
    assert scenario.text == "status=500 , times=2,should_retry=false,no_done"
    assert scenario.error_status == 500


def test_empty_spec_is_the_default() -> None:
    assert parse_scenario("") == Scenario()
    assert parse_scenario(" , ") == Scenario(text=",")


def test_later_items_win() -> None:
    assert parse_scenario("chunks=3,chunks=5").chunks == 5


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("sttaus=500", "unknown scenario key"),
        ("chunks", "needs a value"),
        ("chunks=many", "needs an integer"),
        ("chunks=-1", "out of range"),
        ("should_retry=maybe", "true or false"),
        ("status=200", "400-599"),
        ("times=0", "at least 1"),
        ("status=500,hang", "cannot be combined"),
        ("rate_limit,too_large", "cannot be combined"),
    ],
)
def test_bad_specs(spec: str, needle: str) -> None:
    with pytest.raises(ScenarioError, match=needle):
        parse_scenario(spec)


def test_rate_limit_family_is_429() -> None:
    for spec in ("rate_limit", "insufficient_quota", "too_large"):
        assert parse_scenario(spec).error_status == 429


def test_times_limits_the_attempts() -> None:
    scenario = parse_scenario("status=500,times=2")
    assert [scenario.applies_to(n) for n in (1, 2, 3)] == [True, True, False]
    assert parse_scenario("status=500").applies_to(99)


def test_split_model() -> None:
    assert split_model("gpt-4o-mini::status=500,times=2") == ("gpt-4o-mini", "status=500,times=2")
    assert split_model("gpt-4o") == ("gpt-4o", "")


def test_resolve_model() -> None:
    assert resolve_model("gpt-4o-mini") == "gpt-4o-mini-2024-07-18"
    assert resolve_model("gpt-4o") == "gpt-4o-2024-08-06"
    assert resolve_model("o3-mini") == "o3-mini"


def test_text_pieces() -> None:
    assert word_piece(0) == "The"
    assert word_piece(1) == " quick"
    assert word_piece(len(WORDS)) == " the"
    assert all(" " not in word for word in WORDS)
    assert text_of(4) == "The quick brown fox"


def test_prompt_estimate_is_plausible() -> None:
    body = {
        "messages": [{"role": "user", "content": "x" * 40}, {"role": "user", "content": [{"text": "abcd"}]}]
    }
    assert estimate_prompt_tokens(body) == 3 + (3 + 10) + (3 + 1)
    assert estimate_prompt_tokens({}) == 3


def test_plan_reply_choices() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    assert plan_reply({}, chunks=5, refusal=False, parallel_tools=False).words == 5
    assert plan_reply({"tools": [tool]}, chunks=5, refusal=True, parallel_tools=False).refusal
    reply = plan_reply({"tools": [tool]}, chunks=5, refusal=False, parallel_tools=False)
    assert reply.finish_reason == "tool_calls"
    assert json.loads(reply.tool_calls[0].arguments) == {}
    # One tool only: no parallel call even when asked.
    assert len(plan_reply({"tools": [tool]}, chunks=5, refusal=False, parallel_tools=True).tool_calls) == 1


def test_parser_handles_split_and_pipelined_input() -> None:
    parser = RequestParser()
    raw = (
        b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}"
        b"GET /health HTTP/1.0\r\n\r\n"
    )
    parser.feed(raw[:10])
    assert parser.next_request() is None
    parser.feed(raw[10:60])
    assert parser.next_request() is None
    parser.feed(raw[60:])
    first = parser.next_request()
    assert first is not None
    assert (first.method, first.path, first.body, first.keep_alive) == (
        "POST",
        "/v1/chat/completions",
        b"{}",
        True,
    )
    assert first.headers["host"] == "a"
    second = parser.next_request()
    assert second is not None
    assert (second.path, second.keep_alive) == ("/health", False)
    assert parser.next_request() is None


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"nonsense\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\ncontent-length: x\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n", 501),
    ],
)
def test_parser_rejects(raw: bytes, status: int) -> None:
    parser = RequestParser()
    parser.feed(raw)
    with pytest.raises(HttpError) as caught:
        parser.next_request()
    assert caught.value.status == status


def test_frame_chunk_never_emits_the_terminator() -> None:
    assert frame_chunk(b"") == b""
    assert frame_chunk(b"abc") == b"3\r\nabc\r\n"
