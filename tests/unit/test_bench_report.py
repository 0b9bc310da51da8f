"""The benchmark's target lines say what a run measured, and nothing more."""

from __future__ import annotations

from typing import Any

from bench import report


def summary_of_a_slow_run() -> dict[str, Any]:
    # Figures a seconds-long --quick run produces: 100 streams, not the 2,000 of the target.
    row = {"open_streams_mean": 100.0, "errors": 0, "added_ttfe_p99_ms": 3.0, "rss_kb_per_open_stream": 40.0}
    return {"scenarios": {"slow": {"chatgate": row}}}


def results(*, quick: bool) -> dict[str, Any]:
    targets = report._targets(summary_of_a_slow_run(), measured=not quick)
    # The table's per-scenario rows are left out: only its target lines are under test.
    summary = {"scenarios": {}, "targets": targets}
    return {"machine": {"cpu": "cpu", "cores": 2}, "pinning": "", "quick": quick, "summary": summary}


def target_lines(table: str) -> list[str]:
    return table.split("targets:", 1)[1].splitlines()[1:]


def test_a_quick_run_says_its_targets_were_not_measured() -> None:
    lines = target_lines(report.table(results(quick=True)))
    assert len(lines) == 4
    assert all(line.endswith("not measured") for line in lines), lines
    assert "(none is measured by a --quick run)" in report.table(results(quick=True))


def test_a_full_run_judges_its_targets() -> None:
    lines = target_lines(report.table(results(quick=False)))
    marks = {line[:52].strip(): line.rsplit(")", 1)[1].strip() for line in lines}
    assert marks["slow: open streams (mean)"] == "NOT met"
    assert marks["slow: errors"] == "met"


def test_a_scenario_that_did_not_run_is_not_measured() -> None:
    summary: dict[str, Any] = {"scenarios": {"short": {"chatgate": {}}}}
    (target,) = report._targets(summary)
    assert target["met"] is None
    lines = target_lines(report.table({"machine": {"cpu": "c", "cores": 1}, "pinning": "", "summary": {
        "scenarios": {}, "targets": [target]}}))  # fmt: skip
    assert lines[0].endswith("not measured")
