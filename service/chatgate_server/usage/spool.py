"""The spool: usage records that could not reach Postgres, kept on local disk until they can.

``CHATGATE_SPOOL_DIR`` holds one *slot* per running process, so replicas (or test runs)
sharing a working directory never share files::

    slot-0/spool.lock                     held (flock) by the process that owns the slot
    slot-0/segment-000000000007.jsonl     append-only segments, one record per line
    slot-0/dead-letter.jsonl              records Postgres refused as invalid: kept, never replayed
                                          (``chatgate usage-dead-letters`` lists and retries them)

A process takes the first free slot. At start-up it also *adopts* every slot no live
process holds (its owner died or stopped with Postgres away): it moves that slot's
segments into its own, so they are replayed like its own.

A line is ``<crc32 of the JSON, 8 hex digits> <JSON object>`` and a newline. A batch is
written with one ``write`` and made durable with one ``fsync``, so a crash can leave at most a torn
last line; reading checks every line's checksum and skips (with a warning) a line that
is torn or damaged instead of failing the replay. Records are replayed through the same
idempotent insert as live writes, so a segment replayed twice (a crash between
inserting it and deleting it) changes nothing.

The ledger appends to the *active* segment; the replayer first seals it
(later appends start a new segment), then reads, inserts and removes sealed segments,
so replaying never races appending. All methods are blocking file I/O: the ledger runs
them in a worker thread. The object's own bookkeeping is guarded by a lock.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import threading
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from chatgate_server.domain import Cost, CostBasis, Outcome, TokenUsage, UsageRecord

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_SEGMENT_BYTES = 8 * 1024 * 1024
_SEGMENT = re.compile(r"^segment-(\d{12})\.jsonl$")
DEAD_LETTER_FILE = "dead-letter.jsonl"
_MAX_SLOTS = 64


class SpoolError(Exception):
    """The spool directory cannot be used (another process holds it, or it is not writable)."""


class SpoolFull(Exception):
    """The spool has reached its size limit."""


@dataclass(frozen=True, slots=True)
class Segment:
    """A sealed segment file: replay it, then remove it."""

    path: Path
    records: int
    size: int


# --- one record ⇄ one line --------------------------------------------------------------


def record_to_json(r: UsageRecord) -> dict[str, Any]:
    """A record as plain JSON data (the spool's line payload)."""
    return {
        "v": FORMAT_VERSION,
        "request_id": r.request_id,
        "tenant": r.tenant,
        "caller_service": r.caller_service,
        "user_id": r.user_id,
        "requested_model": r.requested_model,
        "resolved_model": r.resolved_model,
        "upstream_response_id": r.upstream_response_id,
        "usage": {
            "input_tokens": r.usage.input_tokens,
            "output_tokens": r.usage.output_tokens,
            "cached_input_tokens": r.usage.cached_input_tokens,
            "reasoning_tokens": r.usage.reasoning_tokens,
            "source": r.usage.source,
            "estimate_encoding": r.usage.estimate_encoding,
        },
        "cost": {
            "usd_micros": r.cost.usd_micros,
            "price_version": r.cost.price_version,
            "basis": r.cost.basis.value if r.cost.basis else None,
        },
        "outcome": r.outcome.value,
        "grpc_status": r.grpc_status,
        "finish_reason": r.finish_reason,
        "attempts": r.attempts,
        "ttft_ms": r.time_to_first_token_ms,
        "duration_ms": r.duration_ms,
        "started_at": r.started_at.isoformat(),
        "trace_id": r.trace_id,
        "span_id": r.span_id,
        "tags": dict(r.tags),
        "request_fingerprint": r.request_fingerprint,
        "service_tier": r.service_tier,
        "credential_id": r.credential_id,
        "deployment": r.deployment,
        "fallback_model": r.fallback_model,
    }


def record_from_json(d: Mapping[str, Any]) -> UsageRecord:
    """The inverse of :func:`record_to_json`; KeyError/ValueError/TypeError when malformed."""
    if d["v"] != FORMAT_VERSION:
        raise ValueError(f"spool format version {d['v']!r}")
    u, c = d["usage"], d["cost"]
    started_at = datetime.fromisoformat(d["started_at"])
    if started_at.utcoffset() is None:
        raise ValueError("started_at without a time zone")
    return UsageRecord(
        request_id=d["request_id"],
        tenant=d["tenant"],
        caller_service=d["caller_service"],
        user_id=d["user_id"],
        requested_model=d["requested_model"],
        resolved_model=d["resolved_model"],
        upstream_response_id=d["upstream_response_id"],
        usage=TokenUsage(
            input_tokens=int(u["input_tokens"]),
            output_tokens=int(u["output_tokens"]),
            cached_input_tokens=int(u["cached_input_tokens"]),
            reasoning_tokens=int(u["reasoning_tokens"]),
            source=u["source"],
            estimate_encoding=u["estimate_encoding"],
        ),
        cost=Cost(
            usd_micros=c["usd_micros"],
            price_version=c["price_version"],
            # Absent from lines written before chatgate recorded it.
            basis=CostBasis(c["basis"]) if c.get("basis") else None,
        ),
        outcome=Outcome(d["outcome"]),
        grpc_status=d["grpc_status"],
        finish_reason=d["finish_reason"],
        attempts=int(d["attempts"]),
        time_to_first_token_ms=d["ttft_ms"],
        duration_ms=float(d["duration_ms"]),
        started_at=started_at,
        trace_id=d["trace_id"],
        span_id=d.get("span_id"),
        tags=dict(d["tags"]),
        request_fingerprint=d.get("request_fingerprint"),
        service_tier=d.get("service_tier"),
        credential_id=d.get("credential_id"),
        deployment=d.get("deployment"),
        fallback_model=d.get("fallback_model"),
    )


def encode_line(record: UsageRecord, **extra: str) -> bytes:
    """One line; ``extra`` keys (a dead letter's ``error``) ride along and are ignored on reading."""
    data = record_to_json(record) | extra
    try:
        payload = orjson.dumps(data)
    except orjson.JSONEncodeError:
        # A lone surrogate (from a JSON escape upstream) is not UTF-8; orjson refuses it,
        # and one such record must not make its whole batch unspoolable.
        payload = orjson.dumps(_scrub(data))
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    return value


def decode_line_json(line: bytes) -> dict[str, Any] | None:
    """A line's JSON object when its checksum holds, else None."""
    checksum, _, payload = line.partition(b" ")
    if not _checksum_ok(checksum, payload):
        return None
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def decode_lines(data: bytes, source: str) -> list[UsageRecord]:
    """Every intact record in ``data``; torn or damaged lines are skipped with a warning."""
    records: list[UsageRecord] = []
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: empty unless the last write was torn
    if tail:
        log.warning(
            "spool %s: torn last line (%d bytes, no newline) skipped; an earlier process "
            "stopped in the middle of writing it",
            source,
            len(tail),
        )
    for number, line in enumerate(lines, start=1):
        checksum, _, payload = line.partition(b" ")
        if not _checksum_ok(checksum, payload):
            log.warning("spool %s: line %d fails its checksum and was skipped", source, number)
            continue
        try:
            records.append(record_from_json(orjson.loads(payload)))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("spool %s: line %d is not a usage record (%s) and was skipped", source, number, exc)
    return records


def _checksum_ok(checksum: bytes, payload: bytes) -> bool:
    try:
        return len(checksum) == 8 and int(checksum, 16) == zlib.crc32(payload)
    except ValueError:
        return False


def append_lines(path: Path, data: bytes) -> None:
    """Append whole lines with one write, made durable (O_APPEND: writers never interleave)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the directory -----------------------------------------------------------------------


def _try_lock(slot: Path) -> int | None:
    """An fd holding ``slot``'s lock, or None when another process holds it."""
    fd = os.open(slot / "spool.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


class Spool:
    """Append-only segment files with a size limit, owned by one process at a time."""

    def __init__(self, root: Path, *, max_bytes: int, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> None:
        self.root = root
        self.directory = root  # this process's slot, once open
        self.max_bytes = max_bytes
        self._segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        # Sealed segments by path, and the active one (None until the next append).
        self._sealed: dict[Path, Segment] = {}
        self._active: Path | None = None
        self._active_fd: int | None = None
        self._active_records = 0
        self._active_size = 0
        self._next_seq = 0

    # -- life cycle

    def open(self) -> None:
        """Take a free slot, find its segments, and adopt the segments of abandoned slots."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for n in range(_MAX_SLOTS):
                slot = self.root / f"slot-{n}"
                slot.mkdir(exist_ok=True)
                fd = _try_lock(slot)
                if fd is not None:
                    break
            else:
                raise SpoolError(f"all {_MAX_SLOTS} slots of the spool directory {self.root} are in use")
        except OSError as exc:
            raise SpoolError(f"cannot use the spool directory {self.root}: {exc.strerror}") from None
        self._lock_fd, self.directory = fd, slot
        for path in sorted(slot.iterdir()):
            match = _SEGMENT.match(path.name)
            if match is not None:
                self._next_seq = max(self._next_seq, int(match[1]) + 1)
        self._adopt_abandoned()
        for path in sorted(slot.iterdir()):
            if _SEGMENT.match(path.name) is None:
                continue
            data = path.read_bytes()
            if not data:
                path.unlink()
                continue
            # Complete lines; a torn tail is reported when the segment is replayed.
            self._sealed[path] = Segment(path, data.count(b"\n"), len(data))
        if self._sealed:
            log.warning(
                "spool %s holds %d usage record(s) from an earlier process; replaying them",
                self.directory,
                self.records,
            )

    def _adopt_abandoned(self) -> None:
        for other in sorted(self.root.glob("slot-*")):
            if other == self.directory or not other.is_dir():
                continue
            fd = _try_lock(other)
            if fd is None:
                continue  # a live process owns it
            try:
                for path in sorted(other.iterdir()):
                    if _SEGMENT.match(path.name) is None:
                        continue
                    # Same file system: a rename is atomic, so a crash mid-adoption
                    # leaves each segment in exactly one slot.
                    path.rename(self.directory / f"segment-{self._next_seq:012d}.jsonl")
                    self._next_seq += 1
            finally:
                os.close(fd)

    def close(self) -> None:
        """Close the active segment and release the directory."""
        with self._lock:
            self._close_active()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    # -- state

    @property
    def records(self) -> int:
        """Records waiting for Postgres (complete lines in every segment)."""
        return sum(s.records for s in self._sealed.values()) + self._active_records

    @property
    def size(self) -> int:
        """Bytes on disk across segments."""
        return sum(s.size for s in self._sealed.values()) + self._active_size

    @property
    def full(self) -> bool:
        return self.size >= self.max_bytes

    # -- writing

    def append(self, records: Sequence[UsageRecord], *, over_limit: bool = False) -> None:
        """Append ``records`` and fsync once. Raises SpoolFull at the limit (unless
        ``over_limit``: at shutdown, disk beats losing the records) and OSError."""
        data = b"".join(encode_line(r) for r in records)
        with self._lock:
            if self.full and not over_limit:
                raise SpoolFull(f"spool {self.directory} is at its limit of {self.max_bytes} bytes")
            if self._active_fd is None or self._active_size >= self._segment_bytes:
                self._open_active()
            assert self._active_fd is not None
            written = 0
            try:
                while written < len(data):
                    written += os.write(self._active_fd, data[written:])
                os.fsync(self._active_fd)
            except OSError:
                # A partial write leaves a torn line the reader skips; seal so the next
                # batch starts clean.
                self._active_size += written
                self._close_active()
                raise
            self._active_records += len(records)
            self._active_size += len(data)

    def dead_letter(self, records: Sequence[UsageRecord], reason: str = "") -> Path:
        """Keep records Postgres refused as invalid, with why, for an operator to look at
        (and retry: :mod:`~chatgate_server.usage.dead_letters`)."""
        path = self.directory / DEAD_LETTER_FILE
        append_lines(path, b"".join(encode_line(r, error=reason) for r in records))
        return path

    def _open_active(self) -> None:
        self._close_active()
        path = self.directory / f"segment-{self._next_seq:012d}.jsonl"
        self._next_seq += 1
        self._active_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        self._active = path
        # The new file's directory entry must survive a crash too.
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _close_active(self) -> None:
        if self._active_fd is not None:
            os.close(self._active_fd)
            self._active_fd = None
        if self._active is not None:
            if self._active_size:
                self._sealed[self._active] = Segment(self._active, self._active_records, self._active_size)
            else:
                self._active.unlink(missing_ok=True)
            self._active = None
            self._active_records = 0
            self._active_size = 0

    # -- replaying

    def seal(self) -> list[Segment]:
        """Seal the active segment; return every sealed segment, oldest first."""
        with self._lock:
            self._close_active()
            return sorted(self._sealed.values(), key=lambda s: s.path.name)

    def read(self, segment: Segment) -> list[UsageRecord]:
        """The intact records of a sealed segment (damaged lines skipped with a warning)."""
        return decode_lines(segment.path.read_bytes(), segment.path.name)

    def remove(self, segment: Segment) -> None:
        """Delete a segment whose records are all in Postgres."""
        with self._lock:
            segment.path.unlink(missing_ok=True)
            self._sealed.pop(segment.path, None)
