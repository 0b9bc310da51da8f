"""The 60-second chaos soak (bench/soak) in the test command.

The real service under upstream fault bursts, random deadlines and cancels, a Postgres
outage, a SIGTERM and a kill -9 with restarts; the soak audits calls against usage
rows, statuses, memory, leftover upstream sockets, secrets and health latency, and
exits non-zero naming each check that failed. docs/RELIABILITY.md has a long run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.timeout(400)
def test_a_one_minute_chaos_soak_passes_its_audit(tmp_path: Path) -> None:
    figures = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--seconds", "60", "--callers", "20", "--json", str(figures)],
        cwd=REPO_ROOT,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=380,
        check=False,
    )
    assert figures.exists(), result.stderr[-4000:]
    outcome = json.loads(figures.read_text())
    assert outcome["failures"] == [], json.dumps(outcome, indent=2)
    assert result.returncode == 0
    # The run did what it claims: load flowed, and both restarts happened.
    assert outcome["figures"]["started_calls"] > 100
    assert outcome["figures"]["restarts"] == 2
