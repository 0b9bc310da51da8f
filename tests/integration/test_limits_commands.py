"""``chatgate limits set | show | clear`` against Postgres, and a running server that
applies what they set within about a second."""

from __future__ import annotations

import asyncio
import io
import uuid
from argparse import Namespace

import grpc
import pytest

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.app import App
from chatgate_server.cli import main
from chatgate_server.limits.commands import run_limits_command


def limits(url: str, *args: str, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv("DATABASE_URL", url)
    return main(["limits", *args])


def show(url: str, *who: str) -> str:
    """``chatgate limits show [SCOPE WHO]``'s output (DATABASE_URL is set by the caller)."""
    out = io.StringIO()
    scope, subject = (who[0], who[1]) if who else (None, None)
    assert run_limits_command(Namespace(action="show", scope=scope, who=subject), out) == 0
    return out.getvalue()


def test_set_show_clear(migrated_database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    url = migrated_database_url
    assert limits(url, "set", "tenant", tenant, "--requests-per-minute", "600", "--spend-per-month-usd", "50",
                  monkeypatch=monkeypatch) == 0  # fmt: skip
    assert limits(url, "set", "user", f"{tenant}/*", "--tokens-per-day", "100000", "--model", "gpt-4o",
                  monkeypatch=monkeypatch) == 0  # fmt: skip
    listing = show(url, "tenant", tenant)
    assert "requests_per_minute  600" in listing and "spend_per_month      $50" in listing
    assert "gpt-4o" in show(url, "user", f"{tenant}/*")
    assert limits(url, "clear", "tenant", tenant, "--kind", "spend_per_month", monkeypatch=monkeypatch) == 0
    assert "spend_per_month" not in show(url, "tenant", tenant)
    # Nothing left to clear: exit 1; a malformed subject: exit 2 with the reason.
    assert limits(url, "clear", "tenant", tenant, "--kind", "spend_per_month", monkeypatch=monkeypatch) == 1
    assert limits(url, "set", "caller", tenant, "--concurrent-streams", "1", monkeypatch=monkeypatch) == 2
    assert limits(url, "set", "tenant", tenant, monkeypatch=monkeypatch) == 2  # no limit named


async def test_a_running_server_applies_a_new_limit_within_seconds(
    app: App, migrated_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    code = await asyncio.to_thread(
        limits, migrated_database_url, "set", "user", f"default/{user}", "--requests-per-minute", "1",
        monkeypatch=monkeypatch,
    )  # fmt: skip
    assert code == 0
    request = pb.CompleteRequest(
        model="gpt-4o-mini", user_id=user, messages=[pb.Message(role=pb.ROLE_USER, text="hi")]
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        refused = None
        for _ in range(40):  # the table polls each second
            try:
                async for _ in stub.Complete(request, timeout=10):
                    pass
            except grpc.aio.AioRpcError as exc:
                refused = exc
                break
            await asyncio.sleep(0.1)
    assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
