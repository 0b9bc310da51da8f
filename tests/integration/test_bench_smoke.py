"""The benchmark suite still runs: a seconds-long smoke run of ``python -m bench --quick``.

It measures nothing worth reading (one-second windows); it checks that every process
starts, every target serves streams without errors, and the JSON report has its
figures. No timing is asserted: benchmarks are read by people, not by tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def run_bench(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m bench …`` in its own process group: on a timeout the servers, the
    simulator and the load it started go too (subprocess.run kills only the bench)."""
    with subprocess.Popen(
        [sys.executable, "-m", "bench", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_the_quick_benchmark_runs_and_reports(tmp_path: Path) -> None:
    result = run_bench(
        ["--quick", "--scenarios", "short,request-ids,slow-consumer", "--no-workers", "--out", str(tmp_path)],
        # ~30 s alone; the bound only catches a hang (a loaded CI host took over 110 s).
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "targets:" in result.stdout  # the table was printed

    report = json.loads((tmp_path / "latest.json").read_text())
    short = report["scenarios"]["short"]["results"]
    # chatgate authenticates every call (the load sends a token); chatgate-noauth does not;
    # chatgate-2dep routes each call across two deployments.
    expected = {"direct", "relay", "ceiling", "chatgate-1msg", "chatgate-noauth", "chatgate", "chatgate-2dep"}
    assert set(short) == expected
    for target, r in short.items():
        assert r["streams"] > 0, target
        assert r["chunks"] == 20 * r["streams"], target
        assert r["errors_total"] == 0, (target, r["error_kinds"])
        assert r["ttfe_ms"]["p50"] is not None, target
        if target != "direct":
            assert r["server"]["cpu_s"] > 0, target
            assert r["server"]["rss_kb_peak"] > 0, target

    # One message per chunk, as the relay does, unless chatgate merges what arrived together
    # (the simulator sends these 20 chunks in one write).
    assert short["relay"]["messages"] == short["relay"]["chunks"]
    assert short["chatgate-1msg"]["messages"] == short["chatgate-1msg"]["chunks"]
    assert short["chatgate"]["messages"] < short["chatgate"]["chunks"] / 2

    slow = report["scenarios"]["slow-consumer"]["results"]["chatgate"]
    assert slow["errors_total"] == 0, slow["error_kinds"]
    assert slow["chunks"] > 0  # the slow callers did take events
    assert slow["upstream_records"]["streams"] > 0

    # Every call with a caller-supplied id of its own was served (none refused as a reuse).
    ids = report["scenarios"]["request-ids"]["results"]["chatgate-ids"]
    assert ids["streams"] > 0 and ids["errors_total"] == 0, ids["error_kinds"]

    summary = report["summary"]
    ratio = summary["scenarios"]["short"]["chatgate"]["cpu_per_1k_chunks_vs_relay"]
    assert ratio is not None and ratio > 0
    assert {t["target"] for t in summary["targets"]} >= {
        "short: chatgate CPU per 1k chunks vs relay",
        "short: chatgate-1msg CPU per 1k chunks vs relay",
    }


def test_the_http_client_comparison_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.http_clients", "--requests", "20", "--rounds", "1"],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[2:]}
    assert {"chatgate", "httpcore", "httpx"} <= set(rows)
    assert rows["chatgate"][-1] == "1.00x"  # the others are reported relative to chatgate's path
