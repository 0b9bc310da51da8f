"""The recorded OpenAI streams (tests/fixtures/openai-streams), as Azure OpenAI sends
them — its prompt-filter chunk first (empty ``choices``), ``content_filter_results`` on
every choice — reach the caller through an Azure deployment exactly as through an OpenAI
one: the same events, in the same order, on Azure's URL with Azure's ``api-key``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest

from chatgate.v1 import chat_pb2 as pb
from tests.integration.recording_upstream import RecordingUpstream
from tests.integration.test_routing import (
    AZURE_KEY,
    CLASSIC,
    StartRouted,
    deployment,
    key_file,
    start_routed,  # noqa: F401 - the fixture
)

CATEGORIES = ("hate", "self_harm", "sexual", "violence")
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "openai-streams"
PROMPT_FILTER = {
    "choices": [],
    "created": 0,
    "id": "",
    "model": "",
    "object": "",
    "prompt_filter_results": [
        {
            "prompt_index": 0,
            "content_filter_results": {
                c: {"filtered": False, "severity": "safe"}
                for c in ("hate", "self_harm", "sexual", "violence")
            },
        }
    ],
}
SAFE = {c: {"filtered": False, "severity": "safe"} for c in CATEGORIES}


def as_azure(recorded: bytes) -> bytes:
    """``recorded`` with Azure's first chunk and per-choice filter results."""
    out = [b"data: " + orjson.dumps(PROMPT_FILTER) + b"\n\n"]
    for block in recorded.split(b"\n\n"):
        line = block.strip()
        if not line.startswith(b"data: {"):
            if line:
                out.append(line + b"\n\n")
            continue
        chunk: dict[str, Any] = orjson.loads(line[len(b"data: ") :])
        for choice in chunk.get("choices", []):
            choice["content_filter_results"] = SAFE if choice.get("delta", {}).get("content") else {}
        out.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    return b"".join(out)


def seen_by_caller(responses: list[pb.CompleteResponse]) -> dict[str, Any]:
    """What the caller saw, joined up: deltas that arrive together are relayed as one
    message (coalescing), so the split depends on timing, never the content. The
    generated request id and the deployment name aside."""
    text, refusal = "", ""
    tools: dict[int, dict[str, str]] = {}
    started = finished = ""
    for r in responses:
        which = r.WhichOneof("event")
        if which == "started":
            r.started.request_id = ""
            started = str(r.started)
        elif which == "content":
            text += r.content.text
        elif which == "refusal":
            refusal += r.refusal.text
        elif which == "tool_call":
            call = tools.setdefault(r.tool_call.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = call["id"] or r.tool_call.id
            call["name"] = call["name"] or r.tool_call.name
            call["arguments"] += r.tool_call.arguments_fragment
        elif which == "finished":
            r.finished.deployment = ""
            finished = str(r.finished)
    return {"started": started, "text": text, "refusal": refusal, "tools": tools, "finished": finished}


@pytest.mark.parametrize("recording", sorted(p.name for p in FIXTURES.glob("sse_*.txt")))
async def test_a_recorded_stream_reads_the_same_through_azure_as_through_openai(
    start_routed: StartRouted,  # noqa: F811 - the fixture
    recording: str,
) -> None:
    recorded = (FIXTURES / recording).read_bytes()
    openai, azure = RecordingUpstream(), RecordingUpstream()
    openai.stream, azure.stream = recorded, as_azure(recorded)
    await openai.start()
    await azure.start()
    try:
        _, stub = await start_routed(
            deployment("openai", f"{openai.root_url}/v1", {"o": "gpt-4o"}),
            deployment(
                "azure",
                azure.root_url,
                {"a": "chat"},
                kind="azure",
                api_version=CLASSIC,
                key_file=key_file(AZURE_KEY),
            ),
        )
        seen = {}
        for model in ("o", "a"):
            ask = pb.CompleteRequest(
                model=model, user_id="u-rec", messages=[pb.Message(role=pb.ROLE_USER, text="hi")]
            )
            call = stub.Complete(ask, timeout=10)
            seen[model] = [r async for r in call]
            assert await call.code() == grpc.StatusCode.OK
    finally:
        await openai.stop()
        await azure.stop()
    assert seen_by_caller(seen["a"]) == seen_by_caller(seen["o"])
    assert seen_by_caller(seen["o"])["finished"]  # the comparison is of whole answers
    assert seen["a"][0].WhichOneof("event") == "started"  # the filter chunk is no event
    [to_azure] = azure.seen
    assert to_azure.target == f"/openai/deployments/chat/chat/completions?api-version={CLASSIC}"
    assert to_azure.headers.get("api-key") == AZURE_KEY and "authorization" not in to_azure.headers
