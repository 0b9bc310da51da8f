"""What reaches Postgres is storable, and a database error is sorted and worded right."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import errors

from chatgate_server.usage import fields
from chatgate_server.usage.connect import with_connect_timeout
from chatgate_server.usage.dberrors import describe, is_bad_record


def test_long_values_are_cut_to_their_size_and_stay_distinct() -> None:
    a, b = "m" * 3000 + "a", "m" * 3000 + "b"
    cut_a, cut_b = fields.text(a, fields.MODEL_BYTES), fields.text(b, fields.MODEL_BYTES)
    assert len(cut_a.encode()) <= fields.MODEL_BYTES
    assert cut_a != cut_b and cut_a.startswith("m" * 900)
    assert fields.text(a, fields.MODEL_BYTES) == cut_a  # deterministic: a replay finds its row
    assert fields.text("gpt-4o-mini", fields.MODEL_BYTES) == "gpt-4o-mini"


def test_multibyte_values_are_cut_by_bytes_at_a_character_boundary() -> None:
    cut = fields.text("é" * 2000, fields.TENANT_BYTES)
    assert len(cut.encode()) <= fields.TENANT_BYTES
    assert cut.startswith("é" * 100)


def test_nul_and_lone_surrogates_become_storable() -> None:
    assert fields.text("a\x00b", 64) == "a\ufffdb"
    assert fields.text("a\ud800b", 64) == "a?b"
    assert fields.tags({"k\x00": "v" * 5000}) == {"k\ufffd": fields.text("v" * 5000, fields.TAG_VALUE_BYTES)}


@pytest.mark.parametrize(
    "exc",
    [
        errors.ProgramLimitExceeded("index row size 3016 exceeds btree version 4 maximum 2704"),
        errors.NumericValueOutOfRange("integer out of range"),
        errors.CheckViolation("violates check constraint"),
        errors.NotNullViolation("null value"),
        psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"),  # client-side
        ValueError("started_at must be timezone-aware"),
    ],
)
def test_a_record_postgres_refuses_is_a_bad_record(exc: BaseException) -> None:
    assert is_bad_record(exc)


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.OperationalError("connection refused"),
        errors.AdminShutdown("terminating connection due to administrator command"),
        errors.QueryCanceled("canceling statement due to statement timeout"),
        errors.UndefinedTable('relation "usage_records" does not exist'),
        errors.DiskFull("could not extend file"),
        errors.ConnectionTimeout("connection timeout expired"),
        TimeoutError(),
        ConnectionResetError(),
    ],
)
def test_postgres_away_or_stuck_is_not_a_bad_record(exc: BaseException) -> None:
    assert not is_bad_record(exc)


def test_an_error_is_one_line_without_the_password() -> None:
    url = "postgresql://app:hunter2-secret@db.internal:5433/billing"
    exc = psycopg.OperationalError(
        'connection failed: connection to server at "db.internal", port 5433 failed:\n'
        '  FATAL:  password authentication failed for user "app" (tried hunter2-secret)\n'
    )
    line = describe(exc, url)
    assert "\n" not in line and "hunter2-secret" not in line
    assert line.startswith("OperationalError: connection failed") and "password authentication failed" in line
    timeout = describe(errors.ConnectionTimeout("connection timeout expired"), url)
    assert "db.internal:5433" in timeout


def test_connect_timeout_is_added_unless_the_url_sets_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    assert "connect_timeout=5" in with_connect_timeout("postgresql://u@h/db")
    assert "connect_timeout=9" in with_connect_timeout("postgresql://u@h/db?connect_timeout=9")
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "3")
    assert with_connect_timeout("postgresql://u@h/db") == "postgresql://u@h/db"
