"""Start (or reuse) an embedded Postgres under .pgdata/ and print its URL.

For newcomers without a database: PyPI's ``pgserver`` ships real Postgres binaries.
The server keeps running after this script exits (so the tests and the demo can use
it); ``python scripts/embedded_pg.py stop`` stops it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pgserver  # type: ignore[attr-defined,unused-ignore]

DATA = Path(__file__).resolve().parent.parent / ".pgdata"


def main() -> int:
    action = sys.argv[1] if len(sys.argv) > 1 else "start"
    server = pgserver.get_server(  # type: ignore[attr-defined,unused-ignore]
        DATA, cleanup_mode=None if action == "start" else "stop"
    )
    if action == "stop":
        server.cleanup()
        return 0
    print(server.get_uri())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
