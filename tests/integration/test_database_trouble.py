"""Database trouble, as an operator meets it: `migrate`, `usage` and `serve` against a
wrong database name, a refused port and a server that accepts TCP and never answers.

Each says what is wrong in one line, within a bounded time, and never prints the
password. Before: `(OperationalError)` and nothing else from serve; `usage` retried for
10 s with pool warnings; against the silent server `migrate` hung and `serve` said
nothing for two minutes (psycopg's default connect timeout is 130 s).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.integration.conftest import TEST_API_KEY

PASSWORD = "pw-DO-NOT-LEAK-7c1e"
# connect_timeout is 5 s by default; the rest is a loaded machine starting Python.
BOUND_S = 25.0


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose kernel completes the TCP handshake and nobody ever reads or answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)  # never accepted: connections queue, complete, and hear nothing
        yield int(sock.getsockname()[1])


@pytest.fixture
def refused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed on return: connecting is refused


def url_with(database_url: str, **params: str) -> str:
    merged = {**conninfo_to_dict(database_url), "password": PASSWORD, **params}
    merged.pop("connect_timeout", None)
    return make_conninfo(**merged)  # type: ignore[arg-type]


@pytest.fixture
def bad_url(request: pytest.FixtureRequest, database_url: str) -> tuple[str, str, str]:
    """(case, DATABASE_URL, what the one line must say); the case is the test's ``case``."""
    case = str(request.node.callspec.params["case"])
    if case == "wrong_database":
        return case, url_with(database_url, dbname="chatgate_no_such_db"), 'database "chatgate_no_such_db"'
    if case == "wrong_user":
        return case, url_with(database_url, user="chatgate_no_such_role"), '"chatgate_no_such_role"'
    if case == "refused":
        port = request.getfixturevalue("refused_port")
        return case, url_with(database_url, host="127.0.0.1", port=str(port)), "Connection refused"
    port = request.getfixturevalue("silent_port")
    return case, url_with(database_url, host="127.0.0.1", port=str(port)), f"127.0.0.1:{port}"


def env_for(url: str) -> dict[str, str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "CHATGATE_", "DATABASE_URL", "PGCONNECT_TIMEOUT"))
    }
    return {**base, "DATABASE_URL": url}


def run(*args: str, url: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "chatgate_server", *args],
        env=env_for(url),
        capture_output=True,
        text=True,
        timeout=BOUND_S * 2,
    )
    return result, time.monotonic() - start


@pytest.mark.parametrize("case", ["wrong_database", "wrong_user", "refused", "silent"])
@pytest.mark.parametrize("command", [("migrate",), ("usage", "--since", "1d")])
def test_migrate_and_usage_say_why_in_one_line_in_bounded_time(
    command: tuple[str, ...], case: str, bad_url: tuple[str, str, str]
) -> None:
    case, url, cause = bad_url
    result, took = run(*command, url=url)
    print(f"{command[0]} / {case}: {took:.1f}s: {result.stderr.strip()}")
    assert result.returncode == 1
    assert took < BOUND_S
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"chatgate: {command[0]}")
    assert cause in lines[0]
    assert PASSWORD not in result.stdout + result.stderr


@pytest.mark.parametrize("case", ["wrong_database", "wrong_user"])
def test_serve_refused_by_the_database_exits_with_the_cause(case: str, bad_url: tuple[str, str, str]) -> None:
    _, url, cause = bad_url
    env = {"OPENAI_API_KEY": TEST_API_KEY, "CHATGATE_LISTEN": "127.0.0.1:0"}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "chatgate_server", "serve"],
        env={**env_for(url), **env},
        capture_output=True,
        text=True,
        timeout=BOUND_S * 2,
    )
    assert time.monotonic() - start < BOUND_S
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("chatgate: cannot use the database at DATABASE_URL: OperationalError")
    assert cause in lines[-1] and "FATAL" in lines[-1]
    assert PASSWORD not in result.stdout + result.stderr


@pytest.mark.parametrize("case", ["refused", "silent"])
def test_serve_with_postgres_unreachable_says_why_and_serves(
    case: str, bad_url: tuple[str, str, str], tmp_path: object
) -> None:
    # Away rather than misconfigured: serve goes on and spools usage rows, saying why.
    _, url, cause = bad_url
    env = {
        "OPENAI_API_KEY": TEST_API_KEY,
        "CHATGATE_LISTEN": "127.0.0.1:0",
        "CHATGATE_LOG_FORMAT": "text",
        "CHATGATE_SPOOL_DIR": str(tmp_path),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatgate_server", "serve"],
        env={**env_for(url), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    start, seen = time.monotonic(), list[str]()
    try:
        while True:
            line = proc.stdout.readline()  # serve logs as it starts; bounded by BOUND_S below
            assert line, "serve exited: " + "".join(seen)
            seen.append(line)
            if "unreachable" in line:
                break
            assert time.monotonic() - start < BOUND_S, "".join(seen)
        took = time.monotonic() - start
        print(f"serve / {case}: {took:.1f}s: {line.strip()}")
        assert took < BOUND_S
        assert cause in line
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    assert PASSWORD not in "".join(seen) + rest
