"""ChunkDecoder (with SSEDecoder in front): recorded OpenAI streams and crafted chunks to events."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from chatgate_server.domain import (
    ContentDelta,
    Finish,
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
from chatgate_server.upstream.chunks import MAX_ID_CHARS, ChunkDecoder
from chatgate_server.upstream.sse import SSEDecoder

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "openai-streams"
FIXTURE_NAMES = ["sse_toolcall_sample.txt", "sse_parallel_tools_sample.txt", "sse_refusal_sample.txt"]


def run(pieces: Iterable[bytes]) -> tuple[list[UpstreamEvent], bool]:
    """Decode a whole stream fed in these pieces: (events, done)."""
    sse = SSEDecoder()
    chunks = ChunkDecoder()
    events: list[UpstreamEvent] = []
    for piece in pieces:
        for payload in sse.feed(piece):
            events.extend(chunks.decode(payload))
    for payload in sse.flush():
        events.extend(chunks.decode(payload))
    return events, chunks.done


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def sse(*payloads: str) -> bytes:
    return b"".join(f"data: {p}\n\n".encode() for p in payloads)


def chunk(
    delta: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    *,
    choices: list[Any] | None = None,
    **extra: Any,
) -> str:
    """A chat.completion.chunk payload, shaped like OpenAI's."""
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1727346182,
        "model": "gpt-4o-2024-08-06",
        "system_fingerprint": "fp_1",
        "choices": choices
        if choices is not None
        else [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}],
    }
    body.update(extra)
    return json.dumps(body)


def decode_one(payload: str) -> list[UpstreamEvent]:
    """Events of one payload, after the stream has started (no ResponseStarted)."""
    decoder = ChunkDecoder()
    decoder.decode(chunk({"role": "assistant", "content": ""}))
    return decoder.decode(payload)


def tool_calls(events: list[UpstreamEvent]) -> dict[int, list[ToolCallDelta]]:
    by_index: dict[int, list[ToolCallDelta]] = {}
    for event in events:
        if isinstance(event, ToolCallDelta):
            by_index.setdefault(event.index, []).append(event)
    return by_index


# --- the recorded streams --------------------------------------------------------------


def test_tool_call_stream() -> None:
    events, done = run([fixture("sse_toolcall_sample.txt")])
    assert done
    args = ['{"', "city", '":"', "New", " York", " City", '"}']
    assert events == [
        ResponseStarted("chatcmpl-ABfwERreu9s99xXsVuOWtIB2UOx62", "gpt-4o-2024-08-06"),
        ToolCallDelta(0, "call_4XzlGBLtUe9dy3GVNV4jhq7h", "get_weather", ""),
        *(ToolCallDelta(0, None, None, piece) for piece in args),
        Finish("tool_calls"),
        UsageReported(TokenUsage(input_tokens=44, output_tokens=16, source="reported")),
    ]
    joined = "".join(e.arguments for e in tool_calls(events)[0])
    assert joined == '{"city":"New York City"}'
    assert json.loads(joined) == {"city": "New York City"}


def test_parallel_tool_calls_stream() -> None:
    events, done = run([fixture("sse_parallel_tools_sample.txt")])
    assert done
    assert events[0] == ResponseStarted("chatcmpl-ABfwAwrNePHUgBBezonVC6MX3zd63", "gpt-4o-2024-08-06")
    assert sum(isinstance(e, ResponseStarted) for e in events) == 1
    calls = tool_calls(events)
    assert sorted(calls) == [0, 1]
    expected = {
        0: (
            "call_JMW1whyEaYG438VE1OIflxA2",
            "GetWeatherArgs",
            {"city": "Edinburgh", "country": "GB", "units": "c"},
        ),
        1: ("call_DNYTawLBoN8fj3KN6qU9N1Ou", "get_stock_price", {"ticker": "AAPL", "exchange": "NASDAQ"}),
    }
    for index, (call_id, name, arguments) in expected.items():
        first, *rest = calls[index]
        assert (first.id, first.name, first.arguments) == (call_id, name, "")
        assert rest
        assert all(e.id is None and e.name is None and e.arguments for e in rest)
        assert json.loads("".join(e.arguments for e in calls[index])) == arguments
    # Index 0 is complete before index 1 starts, as recorded.
    indexes = [e.index for e in events if isinstance(e, ToolCallDelta)]
    assert indexes == sorted(indexes)
    assert events[-2:] == [
        Finish("tool_calls"),
        UsageReported(TokenUsage(input_tokens=149, output_tokens=60, source="reported")),
    ]


def test_refusal_stream() -> None:
    events, done = run([fixture("sse_refusal_sample.txt")])
    assert done
    assert events[0] == ResponseStarted("chatcmpl-ABfw4IfQfCCrcuybFm41wJyxjbkz7", "gpt-4o-2024-08-06")
    refusals = [e for e in events if isinstance(e, RefusalDelta)]
    # The opening chunk's empty refusal "" yields nothing.
    assert all(e.text for e in refusals)
    assert "".join(e.text for e in refusals) == "I'm sorry, I can't assist with that request."
    assert not any(isinstance(e, ContentDelta | ToolCallDelta) for e in events)
    assert events[-2:] == [
        Finish("stop"),
        UsageReported(TokenUsage(input_tokens=79, output_tokens=11, source="reported")),
    ]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_split_anywhere_gives_the_same_events(name: str) -> None:
    raw = fixture(name)
    whole, done = run([raw])
    assert done
    assert len(whole) > 10
    for cut in range(len(raw) + 1):
        assert run([raw[:cut], raw[cut:]]) == (whole, True), f"cut at {cut}"
    rng = random.Random(name)
    for _ in range(30):
        pieces: list[bytes] = []
        pos = 0
        while pos < len(raw):
            size = rng.randint(1, 12)
            pieces.append(raw[pos : pos + size])
            pos += size
        assert run(pieces) == (whole, True)


# --- response start -------------------------------------------------------------------------


def test_response_started_once_and_first() -> None:
    decoder = ChunkDecoder()
    first = decoder.decode(chunk({"role": "assistant", "content": "Hi"}))
    assert first == [ResponseStarted("chatcmpl-1", "gpt-4o-2024-08-06"), ContentDelta("Hi")]
    assert decoder.decode(chunk({"content": " there"})) == [ContentDelta(" there")]
    assert decoder.decode(chunk({"content": "!"}, id="chatcmpl-other")) == [ContentDelta("!")]


def test_response_starts_at_the_first_chunk_with_an_id() -> None:
    # Azure opens with prompt filter results: empty id and model, no choices.
    decoder = ChunkDecoder()
    assert (
        decoder.decode(json.dumps({"id": "", "model": "", "choices": [], "prompt_filter_results": []})) == []
    )
    assert decoder.decode(chunk({"content": "a"}, id="chatcmpl-9")) == [
        ResponseStarted("chatcmpl-9", "gpt-4o-2024-08-06"),
        ContentDelta("a"),
    ]


# --- deltas -----------------------------------------------------------------------------------


def test_content_deltas() -> None:
    assert decode_one(chunk({"content": "Hello"})) == [ContentDelta("Hello")]
    assert decode_one(chunk({"content": ""})) == []
    assert decode_one(chunk({"content": None, "refusal": None})) == []
    assert decode_one(chunk({})) == []


def test_content_refusal_and_tool_call_in_one_chunk_keep_their_order() -> None:
    delta = {
        "content": "c",
        "refusal": "r",
        "tool_calls": [
            {"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{"}},
            {"index": 1, "function": {"arguments": "}"}},
            {"index": 2, "id": "call_c", "type": "function"},
        ],
    }
    assert decode_one(chunk(delta, "stop")) == [
        ContentDelta("c"),
        RefusalDelta("r"),
        ToolCallDelta(0, "call_a", "f", "{"),
        ToolCallDelta(1, None, None, "}"),
        ToolCallDelta(2, "call_c", None, ""),
        Finish("stop"),
    ]


def test_tool_call_fragment_with_null_function_fields() -> None:
    delta = {"tool_calls": [{"index": 0, "id": None, "function": {"name": None, "arguments": None}}]}
    assert decode_one(chunk(delta)) == [ToolCallDelta(0, None, None, "")]


@pytest.mark.parametrize("reason", ["stop", "length", "tool_calls", "content_filter", "function_call"])
def test_known_finish_reasons(reason: str) -> None:
    assert decode_one(chunk({}, reason)) == [Finish(reason)]  # type: ignore[arg-type]


def test_unknown_finish_reason_becomes_none_and_decoding_goes_on() -> None:
    decoder = ChunkDecoder()
    decoder.decode(chunk({"content": "x"}))
    assert decoder.decode(chunk({}, "some_new_reason")) == [Finish(None)]
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert decoder.decode(chunk(choices=[], usage=usage)) == [
        UsageReported(TokenUsage(input_tokens=1, output_tokens=2))
    ]
    assert decoder.decode("[DONE]") == []
    assert decoder.done


def test_only_choice_index_zero_is_relayed() -> None:
    other = {"index": 1, "delta": {"content": "other"}, "finish_reason": "length"}
    mine = {"index": 0, "delta": {"content": "mine"}, "finish_reason": None}
    assert decode_one(chunk(choices=[other])) == []
    assert decode_one(chunk(choices=[other, mine])) == [ContentDelta("mine")]


def test_empty_choices() -> None:
    assert decode_one(chunk(choices=[])) == []
    assert decode_one(chunk(choices=[], usage=None)) == []


# --- usage -------------------------------------------------------------------------------------


def test_usage_with_details() -> None:
    usage = {
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "total_tokens": 1500,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 128,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    [event] = decode_one(chunk(choices=[], usage=usage))
    assert event == UsageReported(
        TokenUsage(
            input_tokens=1200,
            output_tokens=300,
            cached_input_tokens=1024,
            reasoning_tokens=128,
            source="reported",
        )
    )
    assert isinstance(event, UsageReported)
    assert event.usage.total_tokens == 1500


@pytest.mark.parametrize(
    "details",
    [
        {},
        {"prompt_tokens_details": None, "completion_tokens_details": None},
        {"prompt_tokens_details": {}, "completion_tokens_details": {}},
        {
            "prompt_tokens_details": {"cached_tokens": None},
            "completion_tokens_details": {"reasoning_tokens": None},
        },
    ],
    ids=["missing", "null", "empty", "null-counts"],
)
def test_usage_details_missing_or_null(details: dict[str, Any]) -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, **details}
    assert decode_one(chunk(choices=[], usage=usage)) == [
        UsageReported(TokenUsage(input_tokens=10, output_tokens=5, cached_input_tokens=0, reasoning_tokens=0))
    ]


def test_usage_null_and_absent_report_nothing() -> None:
    with_null = chunk({"content": "a"}, usage=None)
    assert '"usage": null' in with_null
    without = chunk({"content": "a"})
    assert "usage" not in without
    assert decode_one(with_null) == [ContentDelta("a")]
    assert decode_one(without) == [ContentDelta("a")]


def test_usage_on_a_chunk_with_a_choice() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert decode_one(chunk({"content": "z"}, "stop", usage=usage)) == [
        ContentDelta("z"),
        Finish("stop"),
        UsageReported(TokenUsage(input_tokens=3, output_tokens=4)),
    ]


# --- unknown fields ---------------------------------------------------------------------------


def test_unknown_fields_are_ignored() -> None:
    noisy = json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-4o-2024-08-06",
            "service_tier": "default",
            "system_fingerprint": "fp_1",
            "obfuscation": "k3Jx",
            "moderation": {"flagged": False, "categories": {}},
            "some_future_field": [1, {"x": None}],
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": "hi", "annotations": [], "audio": None, "future": {"a": 1}},
                    "logprobs": {"content": [{"token": "hi", "logprob": -0.1, "bytes": [104, 105]}]},
                    "finish_reason": None,
                    "content_filter_results": {"hate": {"filtered": False}},
                }
            ],
        }
    )
    # service_tier and logprobs are read (the row records the one, the caller gets the
    # other); the rest is ignored.
    assert ChunkDecoder().decode(noisy) == [
        ResponseStarted("chatcmpl-1", "gpt-4o-2024-08-06", "default"),
        ContentDelta("hi", (TokenLogprob("hi", -0.1, b"hi"),)),
    ]


# --- [DONE] and the end of the stream -----------------------------------------------------------


def test_done_yields_nothing_and_later_payloads_are_ignored() -> None:
    decoder = ChunkDecoder()
    assert not decoder.done
    assert decoder.decode(chunk({"content": "a"}))
    assert not decoder.done
    assert decoder.decode("[DONE]") == []
    assert decoder.done
    assert decoder.decode(chunk({"content": "late"})) == []
    assert decoder.decode("not json at all") == []


def test_stream_without_done() -> None:
    stream = sse(chunk({"content": "a"}), chunk({}, "stop"))
    events, done = run([stream])
    assert not done
    assert events == [ResponseStarted("chatcmpl-1", "gpt-4o-2024-08-06"), ContentDelta("a"), Finish("stop")]


def test_last_event_without_blank_line_comes_from_flush() -> None:
    sse_decoder = SSEDecoder()
    decoder = ChunkDecoder()
    payloads = sse_decoder.feed(
        f"data: {chunk({'content': 'a'})}\n\ndata: {chunk({'content': 'b'})}\n".encode()
    )
    assert [e for p in payloads for e in decoder.decode(p)] == [
        ResponseStarted("chatcmpl-1", "gpt-4o-2024-08-06"),
        ContentDelta("a"),
    ]
    [pending] = sse_decoder.flush()
    assert decoder.decode(pending) == [ContentDelta("b")]
    assert not decoder.done
    # And a [DONE] that lost its blank line still ends the stream.
    events, done = run([sse(chunk({"content": "a"})) + b"data: [DONE]"])
    assert done
    assert events[-1] == ContentDelta("a")


def test_multibyte_content_split_across_feeds() -> None:
    texts = ["héllo", " wörld — ", "中文", " 😀👍🏽"]
    # ensure_ascii=False: real UTF-8 bytes on the wire, not \u escapes.
    stream = sse(
        *(
            json.dumps(
                {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": t}}]},
                ensure_ascii=False,
            )
            for t in texts
        ),
        "[DONE]",
    )
    assert "😀".encode() in stream
    for cut in range(len(stream) + 1):
        events, done = run([stream[:cut], stream[cut:]])
        assert done
        assert events == [ResponseStarted("c", "m"), *(ContentDelta(t) for t in texts)], f"cut at {cut}"


# --- errors ---------------------------------------------------------------------------------------


def test_error_event_mid_stream() -> None:
    error = {
        "error": {
            "message": "The server had an error processing your request. SECRET-DETAIL",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    sse_decoder = SSEDecoder()
    decoder = ChunkDecoder()
    events: list[UpstreamEvent] = []
    stream = sse(chunk({"content": "par"}), chunk({"content": "tial"}), json.dumps(error), "[DONE]")
    with pytest.raises(UpstreamError) as caught:
        for payload in sse_decoder.feed(stream):
            events.extend(decoder.decode(payload))
    assert events == [
        ResponseStarted("chatcmpl-1", "gpt-4o-2024-08-06"),
        ContentDelta("par"),
        ContentDelta("tial"),
    ]
    exc = caught.value
    assert type(exc) is UpstreamError  # the base class: retryability is decided elsewhere
    assert exc.message == "upstream reported an error mid-stream (type=server_error, code=internal_error)"
    assert str(exc) == exc.message
    assert "SECRET" not in exc.message
    assert exc.http_status is None
    assert not decoder.done


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ({"message": "x", "type": "server_error", "code": None}, "(type=server_error, code=none)"),
        ({"message": "x"}, "(type=none, code=none)"),
        ({"type": "invalid_request_error", "code": 400}, "(type=invalid_request_error, code=400)"),
        ({"type": "a b\nc<script>", "code": "x" * 200}, "(type=other, code=other)"),
        # Identifier-shaped is not enough: a code once carried a live key.
        ({"type": "server_error", "code": "sk_live_51HxYz"}, "(type=server_error, code=other)"),
        ({"type": ["not", "a", "string"], "code": {"x": 1}}, "(type=other, code=other)"),
        ("a bare error string, not an object", "(type=other, code=other)"),
    ],
)
def test_error_event_quotes_only_known_type_and_code(error: Any, expected: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        ChunkDecoder().decode(json.dumps({"error": error}))
    assert type(caught.value) is UpstreamError
    assert caught.value.message == f"upstream reported an error mid-stream {expected}"
    assert "bare error string" not in caught.value.message


def test_a_null_error_field_is_not_an_error() -> None:
    assert decode_one(chunk({"content": "ok"}, error=None)) == [ContentDelta("ok")]


@pytest.mark.parametrize(
    "payload",
    [
        '{"id":"chatcmpl-1","choices":[{"index":0,"delta":{"content":"SECRET',  # truncated
        "SECRET plain text",
        "",
        "{'single': 'quotes SECRET'}",
        '{"choices": []} trailing SECRET',
    ],
)
def test_malformed_json(payload: str) -> None:
    with pytest.raises(UpstreamProtocolError) as caught:
        ChunkDecoder().decode(payload)
    assert caught.value.message == "upstream stream event is not valid JSON"
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__  # the JSON error (which holds the payload) is dropped


NOT_AN_OBJECT = "upstream stream event is not a JSON object"
NOT_A_CHUNK = "upstream stream event is not a chat completion chunk"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ('["SECRET"]', NOT_AN_OBJECT),
        ("42", NOT_AN_OBJECT),
        ('"SECRET"', NOT_AN_OBJECT),
        ("null", NOT_AN_OBJECT),
        ('{"object": "chat.completion.chunk", "id": "chatcmpl-1"}', NOT_A_CHUNK),
        ('{"choices": null}', NOT_A_CHUNK),
        ('{"choices": {"0": {}}}', NOT_A_CHUNK),
        ('{"choices": "SECRET"}', NOT_A_CHUNK),
        ('{"error": {}}', NOT_A_CHUNK),  # an empty error object reports nothing, and is no chunk
    ],
)
def test_payload_that_is_not_a_chunk(payload: str, message: str) -> None:
    with pytest.raises(UpstreamProtocolError) as caught:
        ChunkDecoder().decode(payload)
    assert caught.value.message == message
    assert "SECRET" not in caught.value.message


@pytest.mark.parametrize(
    "payload",
    [
        chunk(choices=["SECRET"]),
        chunk(choices=[{"index": 0, "delta": "SECRET"}]),
        chunk({"content": 5}),
        chunk({"content": ["SECRET"]}),
        chunk({"refusal": {"text": "SECRET"}}),
        chunk({"tool_calls": {"index": 0}}),
        chunk({"tool_calls": [{"id": "call_1", "function": {"name": "f"}}]}),  # no index
        chunk({"tool_calls": [{"index": "0", "function": {"arguments": "SECRET"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": "SECRET"}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 12}}]}),
        chunk({}, choices=[{"index": 0, "delta": {}, "finish_reason": ["SECRET"]}]),
        chunk(choices=[], usage={"prompt_tokens": "10", "completion_tokens": 1}),
        chunk(choices=[], usage={"completion_tokens": 1}),
        chunk(choices=[], usage={"prompt_tokens": 1, "completion_tokens": 1, "prompt_tokens_details": [1]}),
        chunk(choices=[], usage="SECRET"),
        chunk(choices=[], usage={}),
        chunk({"content": "a"}, id=12345),
        chunk({"content": "a"}, model=None),
    ],
)
def test_chunk_with_wrong_types(payload: str) -> None:
    with pytest.raises(UpstreamProtocolError) as caught:
        ChunkDecoder().decode(payload)
    assert "SECRET" not in caught.value.message
    assert "SECRET" not in repr(caught.value.__cause__)


@pytest.mark.parametrize("field", ["id", "model"])
def test_an_oversized_response_id_or_model_never_reaches_the_caller(field: str) -> None:
    # Both go to the caller's started event and into the usage row.
    chunk = {"id": "chatcmpl-1", "model": "gpt-4o-mini", "choices": []}
    chunk[field] = "sk_live_" + "x" * 20_000
    with pytest.raises(UpstreamProtocolError) as caught:
        ChunkDecoder().decode(json.dumps(chunk))
    assert "sk_live" not in caught.value.message
    chunk[field] = "x" * MAX_ID_CHARS
    assert ChunkDecoder().decode(json.dumps(chunk))


# --- log-probabilities and the service tier ------------------------------------------------------


def _chunk(choice: dict[str, Any], **top: Any) -> str:
    return json.dumps({"id": "chatcmpl-1", "model": "gpt-4o", "choices": [choice], **top})


def test_logprobs_ride_with_their_text_alternatives_included() -> None:
    decoder = ChunkDecoder()
    decoder.decode(_chunk({"index": 0, "delta": {"role": "assistant", "content": ""}}))
    logprobs = {
        "content": [
            {
                "token": " caf",
                "logprob": -0.25,
                "bytes": [32, 99, 97, 102],
                "top_logprobs": [
                    {"token": " caf", "logprob": -0.25, "bytes": [32, 99, 97, 102]},
                    {"token": " tea", "logprob": -2, "bytes": None},
                ],
            },
            {"token": "\\xc3", "logprob": -9999.0, "bytes": [195], "top_logprobs": []},
        ],
        "refusal": None,
    }
    events = decoder.decode(_chunk({"index": 0, "delta": {"content": " caf\u00c3"}, "logprobs": logprobs}))
    assert events == [
        ContentDelta(
            " caf\u00c3",
            (
                TokenLogprob(
                    " caf", -0.25, b" caf", (TopLogprob(" caf", -0.25, b" caf"), TopLogprob(" tea", -2.0))
                ),
                TokenLogprob("\\xc3", -9999.0, b"\xc3"),
            ),
        )
    ]


def test_null_or_empty_logprobs_leave_a_plain_delta() -> None:
    decoder = ChunkDecoder()
    nothing: tuple[object, ...] = (None, {"content": None, "refusal": None}, {"content": []})
    for logprobs in nothing:
        events = decoder.decode(_chunk({"index": 0, "delta": {"content": "hi"}, "logprobs": logprobs}))
        assert events[-1] == ContentDelta("hi")


@pytest.mark.parametrize(
    "token",
    [
        {"token": 5, "logprob": -1.0},
        {"token": "a", "logprob": "-1"},
        {"token": "a", "logprob": -1.0, "bytes": 7},
        {"token": "a", "logprob": -1.0, "bytes": [300]},
        {"token": "a", "logprob": -1.0, "top_logprobs": [{"token": "b", "logprob": None}]},
    ],
)
def test_malformed_logprobs_are_a_protocol_error(token: dict[str, Any]) -> None:
    chunk = _chunk({"index": 0, "delta": {"content": "a"}, "logprobs": {"content": [token]}})
    with pytest.raises(UpstreamProtocolError):
        ChunkDecoder().decode(chunk)


def test_the_service_tier_comes_with_the_first_chunk_and_a_strange_one_is_dropped() -> None:
    first = ChunkDecoder().decode(_chunk({"index": 0, "delta": {}}, service_tier="flex"))
    assert first[0] == ResponseStarted("chatcmpl-1", "gpt-4o", "flex")
    for strange in (7, "x" * 100, None):
        started = ChunkDecoder().decode(_chunk({"index": 0, "delta": {}}, service_tier=strange))[0]
        assert started == ResponseStarted("chatcmpl-1", "gpt-4o", None)
