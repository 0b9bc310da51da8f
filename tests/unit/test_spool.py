"""The spool's file format and bookkeeping: round trips, torn and damaged lines, slots."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import zlib
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from chatgate_server.domain import Cost, CostBasis, Outcome, TokenUsage, UsageRecord
from chatgate_server.usage.spool import (
    Spool,
    SpoolError,
    SpoolFull,
    decode_line_json,
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
        service_tier="priority",
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
        record(3, cost=Cost(7, "v0")),  # no basis: read from a line an older chatgate wrote
    ]
    data = b"".join(encode_line(r) for r in records)
    assert data.count(b"\n") == 3
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


# --- what an operator reads when a line is skipped ------------------------------------------


def line_of(data: object) -> bytes:
    """A line whose checksum holds, whatever its JSON says."""
    payload = orjson.dumps(data)
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def test_each_skipped_line_is_reported_with_its_file_number_and_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path, max_bytes=10**6)
    spool.open()
    try:
        spool.append([record(1)])
        (segment,) = spool.seal()
        damaged = encode_line(record(2)).replace(b"req-2", b"req-9")
        future = record_to_json(record(3)) | {"v": 2}
        naive = record_to_json(record(4)) | {"started_at": "2026-11-03T12:00:00"}
        torn = encode_line(record(5))[:40]
        with segment.path.open("ab") as f:
            f.write(damaged + line_of(future) + line_of(naive) + torn)
        with caplog.at_level(logging.WARNING, logger="chatgate_server.usage.spool"):
            assert spool.read(segment) == [record(1)]
    finally:
        spool.close()
    name = segment.path.name
    assert caplog.messages == [
        f"spool {name}: torn last line (40 bytes, no newline) skipped; an earlier process "
        "stopped in the middle of writing it",
        f"spool {name}: line 2 fails its checksum and was skipped",
        f"spool {name}: line 3 is not a usage record (spool format version 2) and was skipped",
        f"spool {name}: line 4 is not a usage record (started_at without a time zone) and was skipped",
    ]


def test_a_lone_surrogate_is_replaced_and_its_batch_kept(tmp_path: Path) -> None:
    # A JSON escape from upstream can leave half a UTF-16 pair in a string: not UTF-8.
    odd = record(2, user_id="u-\ud800", tags={"\udfff": "x"})
    spool = Spool(tmp_path, max_bytes=10**6)
    spool.open()
    try:
        spool.append([record(1), odd])
        (segment,) = spool.seal()
        assert spool.read(segment) == [record(1), replace(odd, user_id="u-?", tags={"?": "x"})]
    finally:
        spool.close()


# --- dead letters ------------------------------------------------------------------------


def test_dead_letters_are_kept_with_why_and_never_replayed(tmp_path: Path) -> None:
    why = "value too long for type character varying(64)"
    spool = Spool(tmp_path, max_bytes=10**6)
    spool.open()
    try:
        path = spool.dead_letter([record(1), record(2)], why)
        assert spool.dead_letter([record(3)], "bad") == path  # appended, not replaced
        assert path == spool.directory / "dead-letter.jsonl"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # records name tenants and users
        letters = [decode_line_json(line) for line in path.read_bytes().splitlines()]
        assert [letter["error"] for letter in letters if letter] == [why, why, "bad"]
        assert [record_from_json(letter) for letter in letters if letter] == [record(1), record(2), record(3)]
        assert spool.records == 0 and spool.seal() == []
    finally:
        spool.close()


@pytest.mark.parametrize(
    "line",
    [
        encode_line(record(1)).rstrip(b"\n").replace(b"req-1", b"req-9"),  # checksum does not hold
        line_of({"v": 1})[:8] + b" " + b'{"v": 1',  # checksum of another payload
        line_of([1, 2]).rstrip(b"\n"),  # holds, but not an object
        b"%08x %s" % (zlib.crc32(b"{not json"), b"{not json"),  # holds, but not JSON
    ],
)
def test_a_dead_letter_line_that_cannot_be_read_is_none(line: bytes) -> None:
    assert decode_line_json(line) is None


# --- writes that do not go as planned ----------------------------------------------------


def test_short_writes_are_continued_where_they_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A write may take fewer bytes than asked (a signal, a nearly full disk).
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[:100]))
    spool = Spool(tmp_path, max_bytes=10**6)
    spool.open()
    try:
        spool.append([record(1), record(2)])
        path = spool.dead_letter([record(3)], "bad")
        (segment,) = spool.seal()
        assert spool.read(segment) == [record(1), record(2)]
        assert segment.size == segment.path.stat().st_size
        (letter,) = [decode_line_json(line) for line in path.read_bytes().splitlines()]
        assert letter is not None and record_from_json(letter) == record(3)
    finally:
        spool.close()


def on_disk(spool: Spool) -> int:
    return sum(p.stat().st_size for p in spool.directory.glob("segment-*"))


def test_a_failed_write_counts_what_reached_the_disk_and_the_next_batch_starts_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path, max_bytes=10**6)
    spool.open()
    try:
        spool.append([record(1)])
        real_write = os.write

        def disk_full(fd: int, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def some_then_full(fd: int, data: bytes) -> int:
            monkeypatch.setattr(os, "write", disk_full)
            return real_write(fd, data[:100])

        monkeypatch.setattr(os, "write", some_then_full)
        with pytest.raises(OSError):
            spool.append([record(2)])
        monkeypatch.setattr(os, "write", real_write)  # room again
        assert spool.size == on_disk(spool)  # the size limit sees the torn bytes too
        spool.append([record(3)])
        segments = spool.seal()
        assert len(segments) == 2  # nothing was appended after the torn line
        assert [r.request_id for s in segments for r in spool.read(s)] == ["req-1", "req-3"]
        assert spool.size == on_disk(spool)
    finally:
        spool.close()


def test_the_limit_counts_every_batch_not_only_the_last(tmp_path: Path) -> None:
    # CHATGATE_SPOOL_MAX_MB bounds the whole spool: batches of one record add up.
    line = len(encode_line(record(1)))
    spool = Spool(tmp_path, max_bytes=3 * line)
    spool.open()
    try:
        spool.append([record(1)])
        spool.seal()  # sealed segments count as well as the active one
        spool.append([record(2)])
        spool.append([record(3)])
        assert spool.size == on_disk(spool) == 3 * line
        with pytest.raises(SpoolFull):
            spool.append([record(4)])
    finally:
        spool.close()


def test_each_segment_is_a_new_private_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10**6, segment_bytes=1)  # every batch starts a segment
    spool.open()
    try:
        for n in range(3):
            spool.append([record(n)])
        segments = spool.seal()
        assert [r.request_id for s in segments for r in spool.read(s)] == ["req-0", "req-1", "req-2"]
        assert {stat.S_IMODE(s.path.stat().st_mode) for s in segments} == {0o600}
    finally:
        spool.close()


# --- slots, recovery and adoption --------------------------------------------------------


@pytest.fixture
def hold() -> Iterator[Any]:
    """Lock slots the way another chatgate process would (flock on ``spool.lock``)."""
    fds: list[int] = []

    def lock(slot: Path) -> None:
        slot.mkdir(parents=True, exist_ok=True)
        fd = os.open(slot / "spool.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fds.append(fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    yield lock
    for fd in fds:
        os.close(fd)


def test_a_slot_another_process_holds_is_not_taken(tmp_path: Path, hold: Any) -> None:
    hold(tmp_path / "slot-0")  # e.g. the older replica during a rolling restart
    spool = Spool(tmp_path, max_bytes=10**6)
    spool.open()
    try:
        assert spool.directory == tmp_path / "slot-1"
    finally:
        spool.close()


def test_no_free_slot_is_a_clear_error(tmp_path: Path, hold: Any) -> None:
    for n in range(64):
        hold(tmp_path / f"slot-{n}")
    with pytest.raises(SpoolError) as info:
        Spool(tmp_path, max_bytes=10**6).open()
    assert str(info.value) == f"all 64 slots of the spool directory {tmp_path} are in use"


def test_a_spool_directory_that_does_not_exist_yet_is_made(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "var" / "lib" / "chatgate", max_bytes=10**6)
    spool.open()
    try:
        spool.append([record(1)])
        assert spool.directory == tmp_path / "var" / "lib" / "chatgate" / "slot-0"
    finally:
        spool.close()


def test_recovery_reads_past_odd_files_and_empty_segments(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    slot = tmp_path / "slot-0"
    slot.mkdir()
    # Sorted, the dead letters and an empty segment (a crash right after creating it)
    # come before the segment that holds records.
    (slot / "dead-letter.jsonl").write_bytes(encode_line(record(9), error="bad"))
    (slot / "notes.txt").write_text("an operator's note")
    (slot / "segment-000000000000.jsonl").write_bytes(b"")
    kept = encode_line(record(1)) + encode_line(record(2))
    (slot / "segment-000000000001.jsonl").write_bytes(kept)
    spool = Spool(tmp_path, max_bytes=10**6)
    with caplog.at_level(logging.WARNING, logger="chatgate_server.usage.spool"):
        spool.open()
    try:
        assert spool.records == 2 and spool.size == len(kept)
        assert not (slot / "segment-000000000000.jsonl").exists()
        assert caplog.messages == [
            f"spool {slot} holds 2 usage record(s) from an earlier process; replaying them"
        ]
        spool.append([record(3)])  # a new name, after the ones found
        assert [r.request_id for s in spool.seal() for r in spool.read(s)] == ["req-1", "req-2", "req-3"]
    finally:
        spool.close()


def test_adoption_goes_past_live_slots_and_odd_files(tmp_path: Path, hold: Any) -> None:
    hold(tmp_path / "slot-0")  # a live replica: its segments are its own
    dead = tmp_path / "slot-2"  # a replica that died with three segments and a dead letter
    dead.mkdir()
    (dead / "dead-letter.jsonl").write_bytes(encode_line(record(9), error="bad"))
    for n in range(3):
        (dead / f"segment-{n:012d}.jsonl").write_bytes(encode_line(record(n + 1)))
    (tmp_path / "slot-notes.txt").write_text("not a slot")
    spool = Spool(tmp_path, max_bytes=10**6)
    spool.open()
    try:
        assert spool.directory == tmp_path / "slot-1"
        assert spool.records == 3  # no adopted segment took another's name
        spool.append([record(4)])
        got = [r.request_id for s in spool.seal() for r in spool.read(s)]
        assert got == ["req-1", "req-2", "req-3", "req-4"]
        # Its dead letters stay (`chatgate usage-dead-letters` reads every slot).
        assert sorted(p.name for p in dead.iterdir()) == ["dead-letter.jsonl", "spool.lock"]
    finally:
        spool.close()
