"""Where chatgate's CPU goes: py-spy samples it under one scenario's load and folds the stacks.

``python -m bench.profile [--scenario short] [--seconds 10] [--target T]`` starts the
upstream and chatgate as the suite does (same pinning), drives the scenario's load, records
chatgate with ``py-spy record --format raw`` (py-spy must be installed:
``pip install py-spy``; it is not a dependency) and prints the functions with the most
samples, by own time and including callees, with paths shortened. The raw stacks are
kept (``--out``) for a flame graph. Native frames (grpc's C core, uvloop) show up as
time in the Python frame that called them.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from contextlib import ExitStack
from pathlib import Path

from bench.procs import ROOT
from bench.run import Suite
from bench.scenarios import FULL, LIMITED_TARGETS, Scenario

_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<path>.*?)(?::\d+)?\)$")


def short_frame(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m["path"]
    for marker in ("site-packages/", "/service/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3.":
                path = "stdlib/" + path.split("/", 1)[-1]
            break
    return f"{m['fn']} ({path})"


def fold(raw: str) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """(total samples, own samples per function, samples including callees per function)."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [short_frame(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    return total, own, incl


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    p.add_argument("--scenario", default="short", choices=[s.name for s in FULL if not s.slow_consumer])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument(
        "--target",
        default="chatgate",
        choices=["chatgate", *LIMITED_TARGETS],
        help="whose calls: the bench caller, or one held to limits (the limits scenario's targets)",
    )
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "profile.txt")
    p.add_argument("--database-url", default=None)
    p.add_argument("--chatgate-pythonpath")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--trace-sample", type=float, default=0.1, help="as in the suite (0: tracing off)")
    args = p.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        p.error("py-spy is not installed (pip install py-spy)")
    import os

    args.database_url = args.database_url or os.environ.get("DATABASE_URL", "")
    if not args.database_url:
        p.error("DATABASE_URL is not set")
    base = next(s for s in FULL if s.name == args.scenario)
    scenario = Scenario(
        base.name,
        base.description,
        base.concurrency,
        base.chunks,
        delay_ms=base.delay_ms,
        duration_s=args.seconds + 2,
        warmup_s=1.0,
        ramp_s=base.ramp_s,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chatgate-profile-") as tmp, ExitStack() as stack:
        suite = Suite(args, stack, Path(tmp))
        suite.create_database()
        if args.target in LIMITED_TARGETS:
            suite.limited_tokens = suite.limited_callers()  # before chatgate starts
        suite.start_simulator()
        if args.trace_sample > 0:
            suite.start_otlp_sink()
        suite.start_chatgate("chatgate", workers=None, pinned=True)
        server = suite.servers["chatgate"][0]
        result: dict[str, object] = {}
        load = threading.Thread(target=lambda: result.update(suite.load(scenario, args.target, server)))
        load.start()
        threading.Event().wait(1.5)
        subprocess.run(
            [
                *suite.pinning.prefix(suite.pinning.load),
                py_spy,
                "record",
                "--pid",
                str(server.pid),
                "--duration",
                str(int(args.seconds)),
                "--rate",
                "400",
                "--nonblocking",
                "--format",
                "raw",
                "-o",
                str(args.out),
            ],
            check=True,
            capture_output=True,
        )
        load.join()
    total, own, incl = fold(args.out.read_text(errors="replace"))
    print(f"{total} samples of chatgate under '{scenario.name}' ({scenario.description})")
    print(f"raw stacks: {args.out}")
    print("\nown time (the function itself, native code it calls included):")
    for f, n in own.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {f}")
    print("\nincluding callees:")
    for f, n in incl.most_common(args.top * 2):
        print(f"  {100 * n / total:5.1f}%  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
