"""The helper scripts a newcomer meets first say what they do, and print no noise."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_embedded_postgres_prints_no_runtime_dir_warning_and_says_what_stop_did(tmp_path: Path) -> None:
    # As in a container, a root shell or CI: no XDG_RUNTIME_DIR. Warnings are errors, so
    # platformdirs' RuntimeDirWarning (raised when pgserver is imported) fails the script.
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    ran = run_script(
        "-W", "error", "scripts/embedded_pg.py", "stop", "--pgdata", str(tmp_path / "pg"), env=env
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr == ""
    assert ran.stdout == f"no embedded Postgres is running under {tmp_path / 'pg'}: nothing to stop\n"
    assert not (tmp_path / "pg").exists()  # stop started nothing


def test_the_stub_check_prints_one_line() -> None:
    ran = run_script("scripts/gen_protos.py", "--check")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "Writing mypy" not in ran.stdout + ran.stderr
    assert ran.stdout.startswith("generated code is current") and ran.stdout.count("\n") == 1


def test_the_demo_says_the_embedded_postgres_keeps_running() -> None:
    spec = importlib.util.spec_from_file_location("demo", REPO_ROOT / "scripts" / "demo.py")
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    note = demo.EMBEDDED_POSTGRES_NOTE
    assert "keeps running" in note
    stop = ".venv/bin/python scripts/embedded_pg.py stop"
    assert stop in note and stop in (REPO_ROOT / "README.md").read_text()
