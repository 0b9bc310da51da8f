"""Dead letters: usage records Postgres refused, for an operator to list and retry.

The ledger appends a record Postgres refuses for what it holds (SQLSTATE class 22, 23
or 54) to ``dead-letter.jsonl`` in its spool slot, with the reason, and never retries
it on its own: a record that cannot be stored must not block the rows behind it, hold
health down, or come back at every start. Once the cause is fixed (a migration that
widens a limit, a constraint dropped), ``chatgate usage-dead-letters replay`` retries
them, in three steps that a crash at any point leaves safe:

1. *claim*: each slot's ``dead-letter.jsonl`` is renamed ``dead-letter-<ns>.jsonl``, so a
   running ledger that dead-letters meanwhile starts a new file and nothing races;
2. every record, once (by request id and start time), goes through the ledger's
   idempotent insert: stored, found already stored, or refused again;
3. the records still refused (with the new reason), and any not tried because Postgres
   went away, are appended to ``dead-letter.jsonl`` again; the claimed files are deleted.

A replay interrupted between 1 and 3 leaves its claimed files, which the next ``list``
or ``replay`` reads as well (inserting them again changes nothing).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from chatgate_server.domain import UsageRecord
from chatgate_server.usage.dberrors import describe, is_bad_record
from chatgate_server.usage.spool import (
    DEAD_LETTER_FILE,
    append_lines,
    decode_line_json,
    encode_line,
    record_from_json,
)

log = logging.getLogger(__name__)

Insert = Callable[[Sequence[UsageRecord]], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: UsageRecord
    error: str
    """Why Postgres refused it, as logged when it was dead-lettered."""
    path: Path


@dataclass(slots=True)
class ReplayResult:
    stored: int = 0
    already_stored: int = 0
    refused: list[DeadLetter] = field(default_factory=list)
    untried: int = 0
    """Records not tried because Postgres went away during the replay (kept)."""


def dead_letter_files(spool_root: Path) -> list[Path]:
    """Every dead-letter file under the spool directory (all slots, claimed files too)."""
    return sorted(spool_root.glob(f"slot-*/{DEAD_LETTER_FILE.removesuffix('.jsonl')}*.jsonl"))


def read_dead_letters(paths: Sequence[Path]) -> list[DeadLetter]:
    """The records in ``paths``, each once (a record dead-lettered twice is one letter)."""
    letters: dict[tuple[str, datetime], DeadLetter] = {}
    for path in paths:
        for number, line in enumerate(path.read_bytes().splitlines(), start=1):
            data = decode_line_json(line)
            try:
                record = record_from_json(data) if data is not None else None
            except (ValueError, KeyError, TypeError):
                record = None
            if data is None or record is None:
                log.warning("dead letters %s: line %d is damaged and was skipped", path, number)
                continue
            letters.setdefault(
                (record.request_id, record.started_at), DeadLetter(record, str(data.get("error", "")), path)
            )
    return sorted(letters.values(), key=lambda d: d.record.started_at)


def claim(spool_root: Path) -> list[Path]:
    """Step 1: rename every slot's live dead-letter file; return all files to replay."""
    for path in spool_root.glob(f"slot-*/{DEAD_LETTER_FILE}"):
        path.rename(path.with_name(f"dead-letter-{time.time_ns()}.jsonl"))
    return [p for p in dead_letter_files(spool_root) if p.name != DEAD_LETTER_FILE]


async def replay(insert: Insert, spool_root: Path) -> ReplayResult:
    """Retry every dead letter under ``spool_root`` (see the module doc). Raises the
    error that stopped it when Postgres went away (after keeping what was not stored)."""
    claimed = claim(spool_root)
    result = ReplayResult()
    keep: list[DeadLetter] = []
    stopped: BaseException | None = None
    for letter in read_dead_letters(claimed):
        if stopped is not None:
            keep.append(letter)
            result.untried += 1
            continue
        try:
            inserted = await insert([letter.record])
        except Exception as exc:  # noqa: BLE001 - sorted by is_bad_record
            if is_bad_record(exc):
                refused = DeadLetter(letter.record, describe(exc), letter.path)
                result.refused.append(refused)
                keep.append(refused)
            else:
                stopped = exc
                keep.append(letter)
                result.untried += 1
            continue
        if inserted:
            result.stored += 1
        else:
            result.already_stored += 1
    _keep(keep)
    for path in claimed:
        path.unlink(missing_ok=True)
    if stopped is not None:
        raise stopped
    return result


def _keep(letters: Sequence[DeadLetter]) -> None:
    """Step 3: back into the live dead-letter file of the slot each came from."""
    by_slot: dict[Path, list[DeadLetter]] = {}
    for letter in letters:
        by_slot.setdefault(letter.path.parent, []).append(letter)
    for slot, kept in by_slot.items():
        append_lines(slot / DEAD_LETTER_FILE, b"".join(encode_line(d.record, error=d.error) for d in kept))
