"""Blocks with absurd reasons and subjects: ``chatgate block`` refuses what the table
cannot hold with one usage line (exit 2); a reason at the table's bound, full of control
characters and unicode, reaches the refused caller as PERMISSION_DENIED / BLOCKED with
a message bounded in bytes (the status travels in trailers, which gRPC caps)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import psycopg

from chatgate_server.limits import blocks_store
from chatgate_server.limits.blocks_records import Scope, Source, Subject
from chatgate_server.rpc.status import MAX_MESSAGE_BYTES
from tests.integration.conftest import AppFactory
from tests.integration.test_blocks import PROMISE_S, cli, until_status


def test_block_refuses_a_reason_or_a_name_the_table_cannot_hold(migrated_database_url: str) -> None:
    user = f"default/u-{uuid.uuid4().hex[:8]}"
    for args in (
        ("block", "user", user, "--reason", "r" * 10_000),
        ("block", "user", "default/" + "u" * 300, "--reason", "x"),
        ("block", "tenant", "t" * 200, "--reason", "x"),
        ("unblock", "user", user, "--reason", "r" * 10_000),
    ):
        done = cli(migrated_database_url, *args)
        lines = done.stderr.splitlines()
        assert done.returncode == 2 and len(lines) == 1, (args[:3], done.stderr[:500])
        assert "Traceback" not in done.stderr and "DETAIL" not in done.stderr


async def test_a_reason_of_control_characters_and_unicode_reaches_the_caller_bounded(
    start_app: AppFactory, migrated_database_url: str
) -> None:
    app = await start_app()
    user = f"u-{uuid.uuid4().hex[:8]}"
    reason = ("\x1b[31m\r\n\t\x7f\u202e\u00fc\u4e2d\U0001f98a " * 64)[:1024]
    async with await psycopg.AsyncConnection.connect(migrated_database_url, autocommit=True) as conn:
        await blocks_store.block(
            conn,
            Subject(Scope.USER, "default", user),
            source=Source.OPERATOR,
            reason=reason,
            actor="test",
            now=datetime.now(UTC),
            expires_at=None,
        )
    _, (status, error_reason, message) = await until_status(
        f"127.0.0.1:{app.port}", user, "PERMISSION_DENIED", PROMISE_S
    )
    assert (status, error_reason) == ("PERMISSION_DENIED", "BLOCKED")
    assert len(message.encode()) <= MAX_MESSAGE_BYTES and f"user default/{user} is blocked" in message
