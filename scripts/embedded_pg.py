"""Start (or reuse) an embedded Postgres under .pgdata/ and print its URL.

    python scripts/embedded_pg.py [start]   start it unless it runs; print its URL
    python scripts/embedded_pg.py stop      stop it, and say what was stopped

For newcomers without a database: PyPI's ``pgserver`` ships real Postgres binaries.
The server keeps running after this script exits (so the tests and the demo can use
it) until ``stop``. As root, pgserver runs Postgres as a system user ``pgserver`` that
it creates (``useradd``), hands .pgdata/ to it and lets other users traverse the
folders above it (Postgres refuses to run as root). ``--pgdata DIR`` uses another folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / ".pgdata"
# pgserver keeps a lock file in the user's XDG runtime directory. Where none is set (a
# container, a root shell, CI) platformdirs warns and falls back to a shared temporary
# folder on every import; this checkout's own private folder is a proper one.
RUNTIME = ROOT / ".pgrun"


def use_private_runtime_dir() -> None:
    if os.environ.get("XDG_RUNTIME_DIR"):
        return
    RUNTIME.mkdir(mode=0o700, exist_ok=True)
    RUNTIME.chmod(0o700)  # as the XDG spec asks (and platformdirs checks)
    os.environ["XDG_RUNTIME_DIR"] = str(RUNTIME)


def start(data: Path) -> int:
    import pgserver  # type: ignore[attr-defined,unused-ignore]

    server = pgserver.get_server(data, cleanup_mode=None)  # type: ignore[attr-defined,unused-ignore]
    print(server.get_uri())
    return 0


def stop(data: Path) -> int:
    import pgserver  # type: ignore[attr-defined,unused-ignore]
    from pgserver.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(data) if data.is_dir() else None
    if info is None or not info.is_running():
        # get_server would start one only to stop it: say so and leave it alone.
        print(f"no embedded Postgres is running under {data}: nothing to stop")
        return 0
    pgserver.get_server(data, cleanup_mode="stop").cleanup()  # type: ignore[attr-defined,unused-ignore]
    print(f"stopped the embedded Postgres under {data} (pid {info.pid}); its data stays there")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", nargs="?", choices=("start", "stop"), default="start")
    parser.add_argument("--pgdata", type=Path, default=DATA, help="the data folder (default .pgdata/)")
    args = parser.parse_args(argv)
    use_private_runtime_dir()
    data = args.pgdata.resolve()
    return start(data) if args.action == "start" else stop(data)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
