"""A dev tool in a virtual environment of its own, installed from its hashed lock.

    .venv/bin/python scripts/tool_venv.py checkov            make .venv/tools/checkov, print its bin/
    .venv/bin/python scripts/tool_venv.py --lock checkov     renew scripts/tools/checkov.lock

Some tools pin dependencies ours cannot share (checkov brings ~95 packages, ``packaging``
among them at an older version than pytest wants), so they do not go into the project's
venv. Each has ``scripts/tools/<name>.in`` (the pinned tool) and ``<name>.lock`` (every
package, with hashes, resolved by uv for Python 3.11 on every platform); the venv lives
under ``.venv/tools/<name>`` and is rebuilt only when the lock changes (a stamp holds the
lock's hash), so after the first install (~35 s for checkov) this costs nothing.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import venv
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "scripts" / "tools"
VENVS = ROOT / ".venv" / "tools"


def lock_file(name: str) -> Path:
    path = TOOLS / f"{name}.lock"
    if not path.is_file():
        raise SystemExit(f"no lock for tool {name!r}: expected {path.relative_to(ROOT)}")
    return path


def ensure(name: str) -> Path:
    """The bin/ directory of the tool's venv, installed from its lock if not already."""
    lock = lock_file(name)
    home = VENVS / name
    stamp = home / ".installed-lock-sha256"
    wanted = hashlib.sha256(lock.read_bytes()).hexdigest()
    if stamp.is_file() and stamp.read_text() == wanted:
        return home / "bin"
    if home.exists():
        shutil.rmtree(home)
    venv.create(home, with_pip=True)
    pip = [str(home / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # --no-deps: the lock already lists every package; --require-hashes: nothing else.
    subprocess.run([*pip, "--require-hashes", "--no-deps", "-r", str(lock)], check=True)
    stamp.write_text(wanted)
    return home / "bin"


def renew_lock(name: str, extra: Sequence[str]) -> int:
    """Resolve ``<name>.in`` into ``<name>.lock`` with uv (a pinned dev dependency)."""
    uv = Path(sys.executable).with_name("uv")
    command = [
        str(uv if uv.exists() else "uv"), "pip", "compile", str(TOOLS / f"{name}.in"),
        "--universal", "--python-version", "3.11", "--generate-hashes", "--quiet",
        "--custom-compile-command", f"scripts/tool_venv.py --lock {name}",
        "-o", str(TOOLS / f"{name}.lock"), *extra,
    ]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, check=False).returncode


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["--lock"] and len(argv) >= 2:
        return renew_lock(argv[1], argv[2:])
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(ensure(argv[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
