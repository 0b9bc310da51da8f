"""The chatgate command: bad configuration is one clear line and a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.integration.conftest import TEST_API_KEY


def run_chatgate(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CHATGATE_", "DATABASE_URL"))}
    return subprocess.run(
        [sys.executable, "-m", "chatgate_server", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


GOOD = {"OPENAI_API_KEY": TEST_API_KEY, "DATABASE_URL": "postgresql://127.0.0.1:1/none"}


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"DATABASE_URL": GOOD["DATABASE_URL"]}, "OPENAI_API_KEY"),
        ({"OPENAI_API_KEY": TEST_API_KEY}, "DATABASE_URL"),
        ({**GOOD, "CHATGATE_LISTEN": "nonsense"}, "CHATGATE_LISTEN"),
        ({**GOOD, "CHATGATE_DEADLINE_CAP_SECONDS": "soon"}, "CHATGATE_DEADLINE_CAP_SECONDS"),
        ({**GOOD, "CHATGATE_DEADLINE_CAP_SECONDS": "-1"}, "CHATGATE_DEADLINE_CAP_SECONDS"),
        ({**GOOD, "OPENAI_BASE_URL": "ftp://example.com"}, "OPENAI_BASE_URL"),
        ({**GOOD, "CHATGATE_MIGRATE_ON_START": "maybe"}, "CHATGATE_MIGRATE_ON_START"),
        ({**GOOD, "OPENAI_API_KEY_FILE": "/nonexistent/key", "OPENAI_API_KEY": ""}, "OPENAI_API_KEY_FILE"),
        ({**GOOD, "CHATGATE_AUTH": "maybe"}, "CHATGATE_AUTH"),
        ({**GOOD, "CHATGATE_TLS_CERT_FILE": "/nonexistent/cert"}, "CHATGATE_TLS_KEY_FILE"),
        ({**GOOD, "CHATGATE_TLS_CLIENT_CA_FILE": "/nonexistent/ca"}, "CHATGATE_TLS_CLIENT_CA_FILE"),
        (
            {**GOOD, "CHATGATE_TLS_CERT_FILE": "/nonexistent/crt", "CHATGATE_TLS_KEY_FILE": "/nonexistent/k"},
            "CHATGATE_TLS_CERT_FILE",
        ),
        ({**GOOD, "CHATGATE_REFLECTION": "perhaps"}, "CHATGATE_REFLECTION"),
    ],
)
def test_bad_configuration_is_one_line_naming_the_variable(env: dict[str, str], variable: str) -> None:
    result = run_chatgate("serve", env=env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert "Traceback" not in result.stderr
    assert TEST_API_KEY not in result.stderr + result.stdout


def test_a_database_that_refuses_us_is_one_line_too(database_url: str) -> None:
    # A wrong database name is a setting to fix, not an outage to ride out. (An
    # unreachable Postgres is different: chatgate serves and spools usage rows, see
    # test_ledger_outage.py.)
    params = conninfo_to_dict(database_url)
    params["dbname"] = "chatgate_no_such_database"
    wrong = make_conninfo(**params)  # type: ignore[arg-type]
    result = run_chatgate("serve", env={**GOOD, "DATABASE_URL": wrong, "CHATGATE_LISTEN": "127.0.0.1:0"})
    assert result.returncode != 0
    assert "DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr
    assert TEST_API_KEY not in result.stderr


def test_migrate_needs_database_url() -> None:
    result = run_chatgate("migrate", env={})
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["chatgate: configuration error: DATABASE_URL is not set"]


def test_migrate_applies_then_is_a_no_op(migrated_database_url: str) -> None:
    result = run_chatgate("migrate", env={"DATABASE_URL": migrated_database_url})
    assert result.returncode == 0, result.stderr
    assert "applied 0 migration(s)" in result.stdout


def test_serve_refuses_an_unmigrated_database(database_url: str) -> None:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(database_url)
    name = f"{params['dbname']}_empty"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        params["dbname"] = name
        empty = make_conninfo(**params)  # type: ignore[arg-type]
        result = run_chatgate("serve", env={**GOOD, "DATABASE_URL": empty, "CHATGATE_LISTEN": "127.0.0.1:0"})
        assert result.returncode != 0
        assert "chatgate migrate" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
