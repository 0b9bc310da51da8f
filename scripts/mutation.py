"""Mutation testing of the modules that decide, each against its own unit test file.

mutmut 3 reads its settings from ``pyproject.toml`` in the folder it runs in, mutates a
copy of the sources under ``mutants/`` there, and puts only ``./``, ``src/`` or
``source/`` of that copy on the import path. So each module gets its own scratch
folder, ``mutants/<module>/`` (git-ignored, rebuilt on every run): ``service/`` is
copied to ``src/``, ``tests/`` alongside, and a ``pyproject.toml`` whose
``[tool.mutmut]`` names that one module and that one test file. One worker
(``--max-children 1``): the machine is shared, and the table must not depend on load.

Prints one row per module: mutants, killed (a test failed or timed out), survived
(every test passed, or no test of the file ran the code), and the share killed.
``--show`` also prints each survivor's diff. A module that decides admission, limits
or routing belongs in ``MODULES``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / "mutants"

# name -> (module under service/chatgate_server/, its unit test file under tests/unit/)
MODULES: dict[str, tuple[str, str]] = {
    "classify": ("upstream/classify.py", "test_classify.py"),
    "retry": ("upstream/retry.py", "test_retry.py"),
    "sse": ("upstream/sse.py", "test_sse.py"),
    "coalesce": ("upstream/coalesce.py", "test_coalesce.py"),
    "pricing": ("usage/pricing.py", "test_pricing.py"),
    "breaker": ("upstream/breaker.py", "test_breaker.py"),
    "spool": ("usage/spool.py", "test_spool.py"),
    "leases": ("limits/leases.py", "test_limits_leases.py"),
    "buckets": ("limits/buckets.py", "test_limits_buckets.py"),
    "policy": ("limits/policy.py", "test_limits_engine.py"),
    "engine": ("limits/engine.py", "test_limits_engine.py"),
    "router": ("upstream/router.py", "test_router.py"),
    "headroom": ("upstream/headroom.py", "test_headroom.py"),
    "admission": ("admission.py", "test_completion_admission.py"),
    "blocks": ("limits/blocks.py", "test_blocks.py"),
    "anomaly_rules": ("limits/anomaly_rules.py", "test_anomaly_rules.py"),
}

MUTMUT_SETTINGS = """
[tool.mutmut]
source_paths = ["src"]
only_mutate = ["src/chatgate_server/{module}"]
pytest_add_cli_args_test_selection = ["tests/unit/{tests}"]
pytest_add_cli_args = ["-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
use_git_change_detection = false
"""


@dataclass(frozen=True)
class Outcome:
    name: str
    mutants: int
    killed: int
    survived: list[str]

    @property
    def share_killed(self) -> float:
        return 100.0 * self.killed / self.mutants if self.mutants else 0.0


def prepare(name: str, scratch: Path) -> Path:
    """A fresh scratch folder for one module, laid out the way mutmut imports from."""
    module, tests = MODULES[name]
    work = scratch / name
    shutil.rmtree(work, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "service", work / "src", ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    settings = MUTMUT_SETTINGS.format(module=module, tests=tests)
    (work / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + settings)
    return work


# No file a test writes gets bigger than this. A mutant that turns a write loop's
# ``written += n`` into ``-=`` writes the same bytes forever: without a cap it filled
# 3.6 GB of /tmp before mutmut's timeout stopped it; with one, the next write fails
# (EFBIG, an OSError), the test fails and the mutant is killed at once.
MAX_FILE_BYTES = 256 * 1024 * 1024


def _cap_file_size() -> None:
    """In the mutmut process, before exec (its test processes inherit both)."""
    # Ignored, SIGXFSZ stays ignored across exec: the write fails instead of the
    # process dying of the signal, which mutmut would not count as a kill.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))


def mutmut(work: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run mutmut in ``work``; past ``timeout``, stop it and the test processes it forked."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mutmut", *args],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the forked workers go with it
        preexec_fn=_cap_file_size,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        sys.exit(f"mutmut {args[0]} in {work} took longer than {timeout:.0f} s: stopped")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_one(name: str, scratch: Path, timeout: float, show: bool) -> Outcome:
    work = prepare(name, scratch)
    ran = mutmut(work, "run", "--max-children", "1", timeout=timeout)
    stats_file = work / "mutants" / "mutmut-cicd-stats.json"
    mutmut(work, "export-cicd-stats", timeout=60)
    if not stats_file.exists():
        sys.exit(f"mutmut produced no results for {name}:\n{ran.stdout[-2000:]}\n{ran.stderr[-2000:]}")
    stats = json.loads(stats_file.read_text())
    results = mutmut(work, "results", timeout=60).stdout
    # Everything not killed counts against the module: "no tests" (no test of the file
    # even runs that code) and "suspicious" included, not only "survived".
    survived = [
        mutant.strip()
        for mutant, _, status in (line.rpartition(": ") for line in results.splitlines())
        if mutant and status not in ("killed", "timeout")
    ]
    if show:
        for mutant in survived:
            print(mutmut(work, "show", mutant, timeout=60).stdout, flush=True)
    tested = int(stats["total"]) - int(stats["skipped"])
    return Outcome(name, tested, int(stats["killed"]) + int(stats["timeout"]), survived)


def table(outcomes: list[Outcome]) -> str:
    lines = [
        "| module | mutants | killed | survived | % killed |",
        "|---|---:|---:|---:|---:|",
    ]
    for o in outcomes:
        path = MODULES[o.name][0]
        lines.append(f"| {path} | {o.mutants} | {o.killed} | {len(o.survived)} | {o.share_killed:.0f} % |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help=f"any of {', '.join(MODULES)} (default: all)")
    parser.add_argument("--show", action="store_true", help="print each survivor's diff")
    parser.add_argument(
        "--scratch", type=Path, default=SCRATCH, help="where mutmut works (default: mutants/)"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per module")
    args = parser.parse_args()
    unknown = sorted(set(args.modules) - set(MODULES))
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}: choose from {', '.join(MODULES)}")
    os.environ.setdefault("DATABASE_URL", "postgresql://unused")  # unit tests touch no database
    outcomes = []
    for name in args.modules or list(MODULES):
        started = time.monotonic()
        outcome = run_one(name, args.scratch, args.timeout, args.show)
        print(f"{name}: {outcome.mutants} mutants in {time.monotonic() - started:.0f} s", file=sys.stderr)
        outcomes.append(outcome)
    print(table(outcomes))


if __name__ == "__main__":
    main()
