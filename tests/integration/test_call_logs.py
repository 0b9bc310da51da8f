"""Every log line about a call carries its request id, even with tracing off.

A real call through chatgate against the simulator, with the logging the service
configures (JSON to stderr, or text), captured from stderr.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import orjson
import pytest

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.logs import configure_logging
from tests.integration.conftest import TEST_API_KEY, AppFactory

FAST_RETRIES: dict[str, Any] = {"retry_base_s": 0.01, "retry_cap_s": 0.02}


@pytest.fixture
def service_logging() -> Iterator[None]:
    """The service's own logging setup for the test, then pytest's back."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


async def complete(port: int | None, model: str) -> tuple[str, grpc.StatusCode]:
    request_id = f"logs-{uuid.uuid4().hex[:12]}"
    req = pb.CompleteRequest(
        model=model,
        user_id="u1",
        request_id=request_id,
        messages=[pb.Message(role=pb.ROLE_USER, text="hello")],
    )
    code = grpc.StatusCode.OK
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            async for _ in chat_pb2_grpc.ChatServiceStub(channel).Complete(req, timeout=10):
                pass
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
    return request_id, code


def json_lines(err: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in err.splitlines() if line.startswith("{")]


@pytest.mark.parametrize(
    ("scenario", "code", "statuses"),
    [
        # A 429 then success: one retry line.
        ("rate_limit,retry_after_ms=10,times=1", grpc.StatusCode.OK, [429]),
        # 500 on every attempt: two retry lines, then the give-up line.
        ("status=500", grpc.StatusCode.UNAVAILABLE, [500, 500, 500]),
    ],
)
async def test_every_line_of_a_retried_call_has_its_request_id_and_the_retry_line_its_status(
    start_app: AppFactory,
    service_logging: None,
    capsys: pytest.CaptureFixture[str],
    scenario: str,
    code: grpc.StatusCode,
    statuses: list[int],
) -> None:
    app = await start_app(**FAST_RETRIES)  # no telemetry: tracing is off
    configure_logging("INFO")
    capsys.readouterr()  # only what the call writes

    request_id, got = await complete(app.port, f"gpt-4o-mini::{scenario}")

    assert got == code
    lines = json_lines(capsys.readouterr().err)
    assert lines, "the call wrote no log line"
    assert [line.get("request_id") for line in lines] == [request_id] * len(lines), lines
    assert not any(line.get("trace_id") for line in lines)  # tracing off: the id is what ties them
    retries = [line for line in lines if line["logger"] == "chatgate_server.upstream.retry"]
    assert [line["upstream_status"] for line in retries] == statuses
    assert all(f"HTTP {status}" in line["msg"] for line, status in zip(retries, statuses, strict=True))
    assert [line["attempt"] for line in retries] == list(range(1, len(statuses) + 1))
    assert sum(line["logger"] == "chatgate.access" for line in lines) == 1
    assert all(TEST_API_KEY not in orjson.dumps(line).decode() for line in lines)


async def test_text_lines_carry_the_request_id_too(
    start_app: AppFactory, service_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    app = await start_app(**FAST_RETRIES)
    configure_logging("INFO", json_lines=False)
    capsys.readouterr()

    request_id, got = await complete(app.port, "gpt-4o-mini::status=503,times=1")

    assert got == grpc.StatusCode.OK
    lines = capsys.readouterr().err.splitlines()
    retry = [line for line in lines if "chatgate_server.upstream.retry" in line]
    assert len(retry) == 1
    assert f"[{request_id}]" in retry[0]
    assert "HTTP 503 Service Unavailable" in retry[0]
