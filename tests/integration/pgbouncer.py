"""A real PgBouncer in transaction mode in front of the test Postgres.

Started by the tests that need it, on a free port with a generated ini: every database
of the Postgres behind ``DATABASE_URL`` is reachable through it under the same name.
The pool of server connections is deliberately smaller than the clients' pools, so
consecutive transactions of one client connection really do land on different server
connections — session state (a SET, a prepared statement, a session lock) then breaks
as it would in production.

PgBouncer is a Debian package (``pgbouncer``); ``scripts/test`` installs it when it is
missing and it can. A test that needs it fails, never skips, without it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.integration.replicas import free_port

# Server connections per (database, user): fewer than one chatgate's pools hold.
SERVER_POOL_SIZE = 3


def binary() -> str:
    found = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if Path(p).exists()), None
    )
    if found is None:
        pytest.fail(
            "pgbouncer is not installed: `apt-get install -y pgbouncer` "
            "(./scripts/test installs it when run as root on Debian/Ubuntu)"
        )
    return found


def version(executable: str) -> tuple[int, ...]:
    out = subprocess.run([executable, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"(\d+)\.(\d+)", out)
    assert match is not None, out
    return int(match[1]), int(match[2])


def _ini(database_url: str, port: int, executable: str) -> str:
    target = conninfo_to_dict(database_url)
    backend = " ".join(
        f"{key}={target[key]}" for key in ("host", "port", "user", "password") if target.get(key)
    )
    lines = [
        "[databases]",
        f"* = {backend}",  # any database name: the one of that name behind DATABASE_URL
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        # Clients are not checked (the databases line logs in as DATABASE_URL's user).
        "auth_type = any",
        "pool_mode = transaction",
        f"default_pool_size = {SERVER_POOL_SIZE}",
        # Hand out server connections in turn (not the last one used): a client's next
        # transaction then almost always runs on another one, as under real load.
        "server_round_robin = 1",
        "max_client_conn = 1000",
        "ignore_startup_parameters = extra_float_digits",
    ]
    if version(executable) >= (1, 21):
        # Newer PgBouncers can track prepared statements; the tests want the strict
        # case that every PgBouncer has: none.
        lines.append("max_prepared_statements = 0")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def pgbouncer(database_url: str) -> Iterator[str]:
    """Run PgBouncer in front of ``database_url``'s server; yield ``database_url``
    rewritten to go through it."""
    executable = binary()
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
    folder.chmod(0o755)
    ini = folder / "pgbouncer.ini"
    ini.write_text(_ini(database_url, port, executable))
    ini.chmod(0o644)
    log = (folder / "pgbouncer.log").open("wb")
    # PgBouncer refuses to run as root; as root, it drops to an unprivileged user.
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    proc = subprocess.Popen([executable, *user, str(ini)], stdout=log, stderr=subprocess.STDOUT)
    params = conninfo_to_dict(database_url)
    params.update(host="127.0.0.1", port=str(port))
    url = make_conninfo(**params)  # type: ignore[arg-type]
    try:
        _wait_ready(url, proc, folder / "pgbouncer.log")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            with psycopg.connect(url, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"pgbouncer did not start:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
