"""The spool's file format and bookkeeping: round trips, torn and damaged lines, slots."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from chatgate_server.domain import Cost, CostBasis, Outcome, TokenUsage, UsageRecord
from chatgate_server.usage.spool import (
    Spool,
    SpoolError,
    SpoolFull,
    decode_lines,
    encode_line,
    record_from_json,
    record_to_json,
)


def record(n: int = 0, **overrides: object) -> UsageRecord:
    r = UsageRecord(
        request_id=f"req-{n}",
        tenant="t",
        caller_service="svc",
        user_id="u-ünï",
        requested_model="gpt-4o",
        resolved_model="gpt-4o-2024-08-06",
        upstream_response_id="chatcmpl-1",
        usage=TokenUsage(input_tokens=10, output_tokens=5, cached_input_tokens=2, reasoning_tokens=1),
        cost=Cost(usd_micros=123, price_version="v1", basis=CostBasis.PRICED),
        outcome=Outcome.COMPLETED,
        grpc_status="OK",
        finish_reason="stop",
        attempts=1,
        time_to_first_token_ms=12.5,
        duration_ms=99.25,
        started_at=datetime(2026, 11, 3, 12, 0, 0, 123456, tzinfo=UTC),
        trace_id="abc",
        span_id="00f067aa0ba902b7",
        tags={"feature": "x", "quote": '"'},
        request_fingerprint="00" * 16,
        credential_id="abcdefghijklmnop",
    )
    return replace(r, **overrides)  # type: ignore[arg-type]


def test_every_field_round_trips_through_a_line() -> None:
    records = [
        record(1),
        record(
            2,
            resolved_model=None,
            upstream_response_id=None,
            usage=TokenUsage(input_tokens=3, source="estimated", estimate_encoding="o200k_base"),
            cost=Cost(None, "none", CostBasis.PRICE_UNKNOWN),
            outcome=Outcome.CANCELLED,
            finish_reason=None,
            time_to_first_token_ms=None,
            trace_id=None,
            tags={},
            request_fingerprint=None,
            credential_id=None,
            started_at=datetime(2026, 11, 3, 7, 0, tzinfo=timezone(timedelta(hours=-5))),
        ),
    ]
    data = b"".join(encode_line(r) for r in records)
    assert data.count(b"\n") == 2
    assert decode_lines(data, "test") == records


def test_a_line_from_before_cost_basis_still_loads() -> None:
    line = record_to_json(record(1, cost=Cost(0, "none", CostBasis.NOT_CHARGED)))
    assert line["cost"]["basis"] == "not_charged"
    del line["cost"]["basis"]  # as an older chatgate wrote it
    assert record_from_json(line).cost == Cost(0, "none", None)


def test_a_torn_last_line_is_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    whole = encode_line(record(1)) + encode_line(record(2))
    torn = encode_line(record(3))[:40]
    with caplog.at_level(logging.WARNING, logger="chatgate_server.usage.spool"):
        assert [r.request_id for r in decode_lines(whole + torn, "seg")] == ["req-1", "req-2"]
    assert "torn last line" in caplog.text


@pytest.mark.parametrize(
    "damage",
    [
        lambda line: line.replace(b"req-2", b"req-9"),  # payload changed, checksum not
        lambda line: b"zzzzzzzz" + line[8:],  # checksum unreadable
        lambda line: line[:20] + line[30:],  # bytes lost in the middle
        lambda line: b"\n",  # an empty line
    ],
)
def test_a_damaged_line_in_the_middle_is_skipped_and_the_rest_read(
    damage: object, caplog: pytest.LogCaptureFixture
) -> None:
    lines = [encode_line(record(n)) for n in (1, 2, 3)]
    lines[1] = damage(lines[1])  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger="chatgate_server.usage.spool"):
        got = decode_lines(b"".join(lines), "seg")
    assert [r.request_id for r in got] == ["req-1", "req-3"]
    assert "skipped" in caplog.text


def test_a_line_that_is_valid_json_but_not_a_record_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    import zlib

    payload = b'{"v": 1, "hello": "world"}'
    bogus = b"%08x %s\n" % (zlib.crc32(payload), payload)
    with caplog.at_level(logging.WARNING, logger="chatgate_server.usage.spool"):
        assert decode_lines(bogus + encode_line(record(1)), "seg") == [record(1)]
    assert "not a usage record" in caplog.text


def test_append_seal_read_remove(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000_000)
    spool.open()
    try:
        assert spool.records == 0 and spool.size == 0
        spool.append([record(1), record(2)])
        spool.append([record(3)])
        assert spool.records == 3
        (segment,) = spool.seal()
        spool.append([record(4)])  # after sealing: a new segment
        segments = spool.seal()
        assert [s.records for s in segments] == [3, 1]
        assert [r.request_id for r in spool.read(segments[0])] == ["req-1", "req-2", "req-3"]
        spool.remove(segment)
        assert spool.records == 1
        spool.remove(segments[1])
        assert spool.records == 0 and spool.size == 0
        assert not list(spool.directory.glob("segment-*"))
    finally:
        spool.close()


def test_the_limit_refuses_appends_unless_over_limit(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1)
    spool.open()
    try:
        spool.append([record(1)])  # the first batch fits: the limit is checked before
        assert spool.full
        with pytest.raises(SpoolFull):
            spool.append([record(2)])
        spool.append([record(2)], over_limit=True)  # at shutdown: disk beats losing it
        assert spool.records == 2
    finally:
        spool.close()


def test_a_second_process_takes_its_own_slot(tmp_path: Path) -> None:
    first, second = Spool(tmp_path, max_bytes=10**6), Spool(tmp_path, max_bytes=10**6)
    first.open()
    second.open()
    try:
        assert first.directory != second.directory
        first.append([record(1)])
        second.append([record(2)])
        assert first.records == 1 and second.records == 1
    finally:
        first.close()
        second.close()


def test_a_new_spool_adopts_the_segments_of_a_dead_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = Spool(tmp_path, max_bytes=10**6)
    old.open()
    old.append([record(1), record(2)])
    live = Spool(tmp_path, max_bytes=10**6)
    live.open()  # takes slot-1; slot-0 is still held
    live.append([record(3)])
    old.close()  # the owner of slot-0 is gone, its segment stays
    live.close()

    with caplog.at_level(logging.WARNING, logger="chatgate_server.usage.spool"):
        fresh = Spool(tmp_path, max_bytes=10**6)
        fresh.open()
    try:
        # Everything left behind, from both slots, is now this spool's to replay.
        assert fresh.records == 3
        got = sorted(r.request_id for s in fresh.seal() for r in fresh.read(s))
        assert got == ["req-1", "req-2", "req-3"]
        assert "from an earlier process" in caplog.text
    finally:
        fresh.close()


def test_an_unusable_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SpoolError, match="cannot use the spool directory"):
        Spool(blocker / "spool", max_bytes=1).open()
