"""Absurd limits: amounts of 0, 1, 2^63-1, negative, not numbers; subjects with '/',
'*', unicode, 300 characters; ``limits show`` of many rows; a limit of 0 and a call
whose reservation alone is past its limit refused at once, without a RetryInfo (waiting
never helps), never looping until the deadline."""

from __future__ import annotations

import time
import uuid
from typing import Any

import grpc
import psycopg
import pytest

from chatgate_server.app import App
from chatgate_server.cli import main
from tests.integration.test_limits import TENANT, complete, new_user, quota, request, set_limit
from tests.integration.test_limits_commands import show

pytest_plugins = ["tests.integration.test_limits"]  # its fixtures: limited, chat, slow_simulator

BIGINT_MAX = 2**63 - 1


def run(url: str, monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setenv("DATABASE_URL", url)
    try:
        return main(["limits", *args])
    except SystemExit as exc:  # argparse's usage errors
        return int(exc.code or 0)


@pytest.mark.parametrize(
    ("amount", "code"),
    [("0", 0), ("1", 0), (str(BIGINT_MAX), 0), (str(BIGINT_MAX + 1), 2), ("-1", 2), ("ten", 2), ("1e3", 2)],
)
def test_amounts(
    migrated_database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    amount: str, code: int,
) -> None:  # fmt: skip
    tenant = f"t{uuid.uuid4().hex[:8]}"
    assert (
        run(migrated_database_url, monkeypatch, "set", "tenant", tenant, "--tokens-per-day", amount) == code
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err and (code == 0) == (err == ""), err
    if code:  # argparse's usage, then one line saying what is wrong
        assert "error: argument --tokens-per-day" in err.splitlines()[-1], err


@pytest.mark.parametrize("dollars", ["99999999999999999", "1e30", "-5", "nan", "0.0000001"])
def test_absurd_dollars_are_usage_errors(
    migrated_database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    dollars: str,
) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    assert (
        run(migrated_database_url, monkeypatch, "set", "tenant", tenant, "--spend-per-day-usd", dollars) == 2
    )
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("scope", "who", "code"),
    [
        ("user", "{t}/a/b", 0),  # a user id may hold '/': the tenant is what comes before the first
        ("user", "{t}/*", 0),
        ("tenant", "*", 0),
        ("user", "{t}/\u00fc\u4e2d\U0001f98a", 0),
        ("user", "{t}/" + "u" * 256, 0),
        ("user", "{t}/" + "u" * 300, 2),
        ("tenant", "t" * 300, 2),
        ("caller", "{t}/*", 2),
        ("user", "{t}/", 2),
        ("tenant", "{t}/x", 2),
    ],
)
def test_subjects(
    migrated_database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    scope: str, who: str, code: int,
) -> None:  # fmt: skip
    who = who.replace("{t}", f"t{uuid.uuid4().hex[:8]}")
    got = run(migrated_database_url, monkeypatch, "set", scope, who, "--requests-per-minute", "5")
    err = capsys.readouterr().err
    assert got == code, err
    if code:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("chatgate: limits set: "), err  # one line, no row dump


def test_a_reason_too_long_for_the_row_is_a_usage_error(
    migrated_database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    args = ("set", "tenant", tenant, "--requests-per-minute", "5", "--reason")
    assert run(migrated_database_url, monkeypatch, *args, "r" * 1025) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert run(migrated_database_url, monkeypatch, *args, "r" * 1024) == 0


def test_show_of_many_rows(migrated_database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    with psycopg.connect(migrated_database_url, autocommit=True) as db:
        db.execute(
            "INSERT INTO limits (scope, tenant, subject, kind, amount)"
            " SELECT 'user', %s, 'u' || n, 'tokens_per_day', n FROM generate_series(1, 3000) AS n",
            (tenant,),
        )
    monkeypatch.setenv("DATABASE_URL", migrated_database_url)
    t0 = time.monotonic()
    listed = [line for line in show(migrated_database_url).splitlines() if tenant in line]
    assert len(listed) == 3000 and time.monotonic() - t0 < 20


@pytest.mark.parametrize(
    ("kind", "amount", "max_tokens"),
    [
        ("requests_per_minute", 0, 100),
        ("tokens_per_minute", 0, 100),
        ("tokens_per_day", 0, 100),
        ("concurrent_streams", 0, 100),
        ("spend_per_day", 0, 100),
        ("tokens_per_minute", 50, 100),  # the reservation alone is past the limit
        ("tokens_per_day", 50, 100),
        ("spend_per_day", 1, 100),
    ],
)
async def test_a_call_that_can_never_fit_is_refused_at_once_without_retry_info(
    limited: App, chat: Any, migrated_database_url: str, kind: str, amount: int, max_tokens: int
) -> None:
    user = new_user()
    with psycopg.connect(migrated_database_url, autocommit=True) as db:
        await set_limit(limited, db, user, kind, amount)
    t0 = time.monotonic()
    got = await complete(chat, request(user, max_tokens=max_tokens))
    took = time.monotonic() - t0
    assert isinstance(got, grpc.aio.AioRpcError), got
    assert got.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (got.code(), got.details())
    reason, delay, violations = quota(got)
    assert reason.endswith("_EXCEEDED") and violations, reason
    assert delay is None, (kind, amount, delay)  # waiting never helps
    assert took < 5, took
    assert TENANT in violations[0][0]
