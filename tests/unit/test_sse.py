"""SSEDecoder: event framing, line ends, comments, fields, and bytes split anywhere."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from pathlib import Path

import pytest

from chatgate_server.upstream.sse import SSEDecoder

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "openai-streams"
FIXTURE_NAMES = ["sse_toolcall_sample.txt", "sse_parallel_tools_sample.txt", "sse_refusal_sample.txt"]


def decode(pieces: Iterable[bytes]) -> list[str]:
    """Feed the pieces in order, then flush; all payloads."""
    decoder = SSEDecoder()
    out: list[str] = []
    for piece in pieces:
        out.extend(decoder.feed(piece))
    out.extend(decoder.flush())
    return out


def random_pieces(data: bytes, rng: random.Random, max_size: int = 9) -> list[bytes]:
    pieces: list[bytes] = []
    pos = 0
    while pos < len(data):
        size = rng.randint(1, max_size)
        pieces.append(data[pos : pos + size])
        pos += size
    return pieces


def every_split(data: bytes) -> Iterable[tuple[int, list[bytes]]]:
    for cut in range(len(data) + 1):
        yield cut, [data[:cut], data[cut:]]


def reference(stream: bytes) -> list[str]:
    """The spec's algorithm, written plainly over the whole stream at once (no buffering)."""
    text = stream.decode("utf-8", "replace")
    text = text.removeprefix("\ufeff")
    events: list[str] = []
    data: list[str] | None = None
    for line in re.split("\r\n|\r|\n", text):
        if line == "":
            if data is not None:
                events.append("\n".join(data))
            data = None
        elif line.startswith(":"):
            continue
        else:
            name, colon, value = line.partition(":")
            if colon and value.startswith(" "):
                value = value[1:]
            if name == "data":
                data = [*(data or []), value]
    if data is not None:  # what flush() promises for an unterminated event
        events.append("\n".join(data))
    return events


def fixture_payloads(name: str) -> tuple[bytes, list[str]]:
    raw = (FIXTURES / name).read_bytes()
    # The fixtures are plain "data: {json}" lines; pick them out independently.
    expected = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    return raw, expected


# --- the recorded streams --------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_whole(name: str) -> None:
    raw, expected = fixture_payloads(name)
    assert len(expected) >= 10
    assert expected[-1] == "[DONE]"
    assert all(p.startswith('{"id":"chatcmpl-') for p in expected[:-1])
    decoder = SSEDecoder()
    assert decoder.feed(raw) == expected
    assert decoder.flush() == []


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_split_at_every_offset(name: str) -> None:
    raw, expected = fixture_payloads(name)
    for cut, pieces in every_split(raw):
        assert decode(pieces) == expected, f"cut at {cut}"


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_byte_by_byte_and_random_pieces(name: str) -> None:
    raw, expected = fixture_payloads(name)
    assert decode(raw[i : i + 1] for i in range(len(raw))) == expected
    rng = random.Random(name)
    for _ in range(50):
        assert decode(random_pieces(raw, rng)) == expected


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("line_end", [b"\r\n", b"\r"], ids=["crlf", "cr"])
def test_fixture_with_other_line_ends(name: str, line_end: bytes) -> None:
    raw, expected = fixture_payloads(name)
    converted = raw.replace(b"\n", line_end)
    assert decode([converted]) == expected
    # Every cut, including each one between the CR and the LF of a CRLF.
    for cut, pieces in every_split(converted):
        assert decode(pieces) == expected, f"cut at {cut}"


def test_events_are_returned_as_soon_as_complete() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: one\n") == []
    assert decoder.feed(b"\ndata: two\n\ndata: thr") == ["one", "two"]
    assert decoder.feed(b"ee\n") == []
    assert decoder.feed(b"\n") == ["three"]
    assert decoder.feed(b"") == []
    assert decoder.flush() == []


# --- line ends ----------------------------------------------------------------------------


def test_crlf_split_across_feeds_is_one_line_end() -> None:
    # Were the LF after the CR taken as a line end of its own, it would be a blank
    # line and "a" and "b" would come out as two events.
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\ndata: b\r") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\r") == ["a\nb"]
    assert decoder.feed(b"\ndata: c\r\n\r\n") == ["c"]
    assert decoder.flush() == []


def test_crlf_split_with_an_empty_feed_in_between() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\ndata: b\r\n\r\n") == ["a\nb"]


def test_lone_cr_then_lf_in_later_feed_is_a_blank_line() -> None:
    # "\r" ends "data: a"; the following "\r" is a blank line; the "\n" after that
    # belongs to the second CR, so "b" is a separate event.
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\r") == ["a"]
    assert decoder.feed(b"\ndata: b\n\n") == ["b"]


def test_mixed_line_ends_in_one_stream() -> None:
    stream = b"data: a\r\n\r\ndata: b\rdata: c\r\rdata: d\n\n: x\r\ndata: e\n\r"
    assert decode([stream]) == ["a", "b\nc", "d", "e"]


# --- fields, comments, data lines ---------------------------------------------------------


def test_comment_lines_are_ignored() -> None:
    stream = b": keep-alive\n\n:\n\ndata: a\n: inside an event\ndata: b\n\n:tail\n"
    assert decode([stream]) == ["a\nb"]


def test_multi_line_data_joins_with_lf() -> None:
    assert decode([b"data: a\ndata: b\ndata: c\n\n"]) == ["a\nb\nc"]
    assert decode([b"data: a\ndata:\ndata: b\n\n"]) == ["a\n\nb"]
    # An empty first line ("data: " then LF right after the space) is still a line.
    assert decode([b"data: \ndata: x\n\n"]) == ["\nx"]


def test_one_optional_space_after_the_colon_is_stripped() -> None:
    stream = b"data:x\n\ndata: x\n\ndata:  x\n\ndata:\n\ndata\n\ndata: \n\ndata:a:b\n\n"
    assert decode([stream]) == ["x", "x", " x", "", "", "", "a:b"]


def test_other_fields_are_ignored() -> None:
    stream = (
        b"event: message\nid: 7\nretry: 1000\ndata: a\n\n"
        b"event: ping\nid: 8\n\n"  # an event without data: dropped
        b"Data: no\ndata : no\ndat: no\nunknown: no\n\n"  # field names are exact
        b"data: b\nevent: late\n\n"
    )
    assert decode([stream]) == ["a", "b"]


def test_extra_blank_lines_yield_nothing() -> None:
    assert decode([b"\n\n\ndata: a\n\n\n\n\ndata: b\n\n\n"]) == ["a", "b"]
    assert decode([b"\n\n\n"]) == []


def test_bom_at_stream_start_is_dropped() -> None:
    assert decode([b"\xef\xbb\xbfdata: a\n\n"]) == ["a"]
    assert decode([b"\xef", b"\xbb", b"\xbfdata: a\n\n"]) == ["a"]
    assert decode([b"\xef\xbb\xbf"]) == []
    # Only at the very start: later it is part of a value.
    assert decode([b"data: a\n\n\xef\xbb\xbfdata: b\n\ndata: \xef\xbb\xbfc\n\n"]) == ["a", "\ufeffc"]


# --- end of stream ------------------------------------------------------------------------


def test_flush_returns_an_event_missing_its_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: b\n") == ["a"]
    assert decoder.flush() == ["b"]
    assert decoder.flush() == []


def test_flush_counts_an_unterminated_last_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\ndata: [DO") == []
    assert decoder.feed(b"NE]") == []
    assert decoder.flush() == ["a\n[DONE]"]


def test_flush_with_nothing_pending() -> None:
    decoder = SSEDecoder()
    assert decoder.flush() == []
    assert decoder.feed(b"data: a\n\n: comment\nevent: x\n") == ["a"]
    assert decoder.flush() == []


def test_flush_after_cr_line_end() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.flush() == ["a"]


# --- UTF-8 ----------------------------------------------------------------------------------


def test_multibyte_characters_split_across_feeds() -> None:
    text = 'data: {"c":"héllo wörld — 中文 😀"}'
    stream = (text + "\n\n" + text + "\r\n\r\n").encode()
    expected = [text[6:], text[6:]]
    for cut, pieces in every_split(stream):
        assert decode(pieces) == expected, f"cut at {cut}"
    assert decode(stream[i : i + 1] for i in range(len(stream))) == expected


def test_invalid_utf8_becomes_replacement_character() -> None:
    assert decode([b"data: a\xffb\n\n"]) == ["a\ufffdb"]
    # One read that completes several events, one of them invalid: the others survive.
    assert decode([b"data: a\xffb\n\ndata: c\n\n"]) == ["a\ufffdb", "c"]
    assert decode([b"data: a\n\ndata: \xe4\xb8\n\ndata: c\n\n"]) == ["a", "\ufffd", "c"]
    # A truncated sequence at the end of the stream.
    assert decode([b"data: a\xe4\xb8"]) == ["a\ufffd"]


def test_line_separators_other_than_cr_and_lf_are_content() -> None:
    # U+2028, U+0085 and form feed are not SSE line ends (str.splitlines would split them).
    value = "a\u2028b\x85c\x0cd\x0be"
    assert decode([f"data: {value}\n\n".encode()]) == [value]
    assert decode([f"data: {value}\r\n\r\n".encode()]) == [value]


# --- against the spec, on random streams ----------------------------------------------------

_LINES = [
    "data: {}",
    'data: {"t":"héllo 😀"}',
    "data:no-space",
    "data:  two spaces",
    "data:",
    "data",
    "data: a:b",
    "data: [DONE]",
    ": comment",
    ":",
    "event: delta",
    "id: 42",
    "retry: 10",
    "data : not data",
    "unknown",
    "",
    "",
    "",
]


def _random_stream(rng: random.Random, line_ends: list[str]) -> bytes:
    lines = [rng.choice(_LINES) for _ in range(rng.randint(0, 25))]
    text = "".join(line + rng.choice(line_ends) for line in lines)
    if rng.random() < 0.3:
        text += rng.choice(_LINES)  # an unterminated last line
    return text.encode()


@pytest.mark.parametrize(
    "line_ends",
    [["\n"], ["\r\n"], ["\r"], ["\n", "\r\n", "\r"]],
    ids=["lf", "crlf", "cr", "mixed"],
)
def test_random_streams_match_the_reference(line_ends: list[str]) -> None:
    rng = random.Random(f"sse-{line_ends}")
    for _ in range(300):
        stream = _random_stream(rng, line_ends)
        expected = reference(stream)
        assert decode([stream]) == expected, stream
        assert decode(random_pieces(stream, rng, max_size=5)) == expected, stream
        assert decode(random_pieces(stream, rng, max_size=40)) == expected, stream


def test_reference_is_not_trivial() -> None:
    # Guards the comparison above: the reference must itself get the spec right.
    assert reference(b"data: a\r\ndata:b\r\r: c\ndata\n\nevent: x\n\ndata:  d") == ["a\nb", "", " d"]
