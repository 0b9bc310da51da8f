"""After the soak: calls against usage rows, statuses, secrets, and the verdicts."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from bench.soak.traffic import CallRecord

# Codes of the error model (docs/CALLING.md). INTERNAL and UNKNOWN are bugs.
ALLOWED_CODES = frozenset(
    {"OK", "CANCELLED", "DEADLINE_EXCEEDED", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"}
)
# A kill -9 loses the rows of calls that ended up to about the ledger's batch linger
# before it (README, "Usage ledger"), and of course the calls it cut. The audit allows
# that window and nothing outside it.
KILL_LOSS_BOUND_S = 1.0


@dataclass
class Timeline:
    """Wall-clock times of the soak's planned events."""

    sigterm_at: float = 0.0
    sigterm_exit_code: int | None = None
    kill_at: float = 0.0
    kill_restarted_at: float = 0.0
    postgres_cut: tuple[float, float] = (0.0, 0.0)


@dataclass
class Report:
    figures: dict[str, object] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, failure: str) -> None:
        if not ok:
            self.failures.append(failure)


def rows_by_request(database_url: str) -> Counter[str]:
    with psycopg.connect(database_url, connect_timeout=10) as conn:
        rows = conn.execute("SELECT request_id, count(*) FROM usage_records GROUP BY request_id").fetchall()
    return Counter({str(request_id): int(n) for request_id, n in rows})


def secret_hits(database_url: str, logs: list[Path], secret: str) -> list[str]:
    """Where the OpenAI key shows up: log files and any column of any usage row."""
    hits = [str(path) for path in logs if path.exists() and secret in path.read_text(errors="replace")]
    with psycopg.connect(database_url, connect_timeout=10) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM usage_records u WHERE row_to_json(u)::text LIKE %s", (f"%{secret}%",)
        ).fetchone() or (0,)
    if count:
        hits.append(f"{count} usage rows")
    return hits


def audit_calls(records: list[CallRecord], rows: Counter[str], timeline: Timeline, report: Report) -> None:
    codes = Counter(r.code for r in records)
    report.figures["calls"] = len(records)
    report.figures["statuses"] = dict(codes.most_common())
    report.figures["reasons"] = dict(Counter(r.reason for r in records if r.reason).most_common())
    bad_codes = {code: n for code, n in codes.items() if code not in ALLOWED_CODES}
    report.check(not bad_codes, f"statuses outside the error model: {bad_codes}")
    incomplete = [r.request_id for r in records if r.code == "OK" and not r.finished]
    report.check(not incomplete, f"{len(incomplete)} streams ended OK without a finished event")

    ids = {r.request_id for r in records}
    duplicates = {rid: n for rid, n in rows.items() if n > 1}
    phantoms = [rid for rid in rows if rid not in ids]
    report.figures["rows"] = sum(rows.values())
    report.figures["duplicate_rows"] = len(duplicates)
    report.figures["rows_without_a_call"] = len(phantoms)
    report.check(not duplicates, f"{len(duplicates)} request ids have more than one row")
    report.check(not phantoms, f"{len(phantoms)} rows match no call")

    # Every call that started streaming was admitted and must have its row, except
    # those the kill -9 cut or that ended just before it (the documented bound).
    window = (timeline.kill_at - KILL_LOSS_BOUND_S, timeline.kill_restarted_at)
    started = [r for r in records if r.started]
    lost = [r for r in started if r.request_id not in rows]
    in_window = [r for r in lost if window[0] <= r.ended_at <= window[1]]
    beyond = [r for r in lost if r not in in_window]
    report.figures["started_calls"] = len(started)
    report.figures["rows_lost_to_kill9"] = len(in_window)
    report.figures["rows_lost_beyond_bound"] = len(beyond)
    report.check(not beyond, f"{len(beyond)} started calls have no row: {[r.request_id for r in beyond[:5]]}")

    cut = [r for r in started if r.code == "DEADLINE_EXCEEDED"]
    with_final = sum(r.finished for r in cut)
    report.figures["deadline_cut_streams_with_finished"] = f"{with_final}/{len(cut)}"
    report.check(with_final == len(cut), f"{len(cut) - with_final} deadline-cut streams lacked `finished`")


def audit_health(latencies_ms: list[float], failures: list[str], report: Report) -> None:
    if len(latencies_ms) >= 2:
        p99 = statistics.quantiles(latencies_ms, n=100)[98]
        report.figures["health_checks"] = len(latencies_ms)
        report.figures["health_p99_ms"] = round(p99, 1)
        report.figures["health_max_ms"] = round(max(latencies_ms), 1)
        report.check(p99 < 1000, f"health Check p99 {p99:.0f} ms under load")
    report.figures["health_failures"] = dict(Counter(failures))
    report.check(not failures, f"health Check failed outside restarts: {dict(Counter(failures))}")


def audit_memory(readings_mb: list[float], report: Report) -> None:
    if not readings_mb:
        return
    start, peak, end = readings_mb[0], max(readings_mb), readings_mb[-1]
    report.figures["rss_mb"] = {"start": round(start), "peak": round(peak), "end": round(end)}
    # Restarts reset the process; what matters is that it does not grow without bound.
    report.check(peak < 1024, f"chatgate's RSS peaked at {peak:.0f} MB")
