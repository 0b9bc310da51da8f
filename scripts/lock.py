"""Renew requirements.lock: the image's third-party packages, pinned and hashed.

    .venv/bin/python scripts/lock.py             keep the pins, follow pyproject changes
    .venv/bin/python scripts/lock.py --upgrade   move every pin to its newest release
    .venv/bin/python scripts/lock.py --check     exit 1 if the lock is not what this makes

The input is requirements.in (our two packages from this checkout, and their build
backend); uv (a pinned dev dependency) resolves it for Python 3.11 on every platform
and writes every file's hash, so the Dockerfile's ``pip install --require-hashes``
installs exactly these files. Our own packages are left out of the lock: the image
builds them from the checkout. Extra arguments go to ``uv pip compile`` (``--offline``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
COMMAND = "scripts/lock.py"
COMPILE_ARGS = (
    "requirements.in",
    "--universal",
    "--python-version",
    "3.11",
    "--generate-hashes",
    "--no-emit-package",
    "chatgate",
    "--no-emit-package",
    "chatgate-client",
    "--custom-compile-command",
    COMMAND,
    "--quiet",
)


def compile_lock(output: Path, extra: Sequence[str] = ()) -> int:
    """Run ``uv pip compile`` into ``output`` (its current pins are kept unless --upgrade)."""
    uv = Path(sys.executable).with_name("uv")
    command = [str(uv if uv.exists() else "uv"), "pip", "compile", *COMPILE_ARGS, "-o", str(output), *extra]
    return subprocess.run(command, cwd=ROOT, check=False).returncode


def main(argv: Sequence[str]) -> int:
    if "--check" not in argv:
        return compile_lock(LOCK, argv)
    extra = [a for a in argv if a != "--check"]
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "requirements.lock"
        shutil.copyfile(LOCK, fresh)  # start from the current pins, as a renewal does
        rc = compile_lock(fresh, extra)
        if rc != 0:
            return rc
        if fresh.read_text() != LOCK.read_text():
            print(f"requirements.lock is stale: run {COMMAND}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
