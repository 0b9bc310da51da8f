"""scripts/mutation works end to end: one small module, its table, and its kill rate.

The full run is slow (docs/TESTING.md); this smoke run of coalesce.py (about sixty
mutants, one worker) keeps the script and its mutmut settings from rotting unnoticed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.timeout(330)
def test_a_mutation_run_of_coalesce_prints_its_row_and_kills_at_least_90_percent(tmp_path: Path) -> None:
    ran = subprocess.run(
        [sys.executable, "scripts/mutation.py", "coalesce", "--scratch", str(tmp_path), "--timeout", "300"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=320,
        check=False,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "| module | mutants | killed | survived | % killed |" in ran.stdout
    row = re.search(r"^\| upstream/coalesce\.py \| (\d+) \| (\d+) \| (\d+) \| (\d+) % \|$", ran.stdout, re.M)
    assert row is not None, ran.stdout
    mutants, killed, survived, _ = map(int, row.groups())
    assert mutants >= 30 and killed + survived == mutants
    assert killed / mutants >= 0.9, ran.stdout
