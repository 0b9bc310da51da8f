"""A completion streamed end to end: grpc.aio client → chatgate → simulator → Postgres."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
import pytest
from google.protobuf import struct_pb2

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.app import App
from chatgate_server.simulator import Simulator
from chatgate_server.simulator.content import text_of
from tests.integration.conftest import TEST_API_KEY, AppFactory

if TYPE_CHECKING:
    from chatgate.v1.chat_pb2_grpc import ChatServiceAsyncStub


def request(model: str = "gpt-4o-mini", **fields: Any) -> pb.CompleteRequest:
    fields.setdefault("messages", [pb.Message(role=pb.ROLE_USER, text="Say something.")])
    return pb.CompleteRequest(model=model, user_id="user-42", **fields)


async def collect(stub: ChatServiceAsyncStub, req: pb.CompleteRequest) -> list[pb.CompleteResponse]:
    return [event async for event in stub.Complete(req, timeout=30)]


def usage_row(db: psycopg.Connection[Any], request_id: str) -> list[dict[str, Any]]:
    cur = db.execute("SELECT * FROM usage_records WHERE request_id = %s", (request_id,))
    names = [d.name for d in cur.description or []]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


async def test_stream_arrives_in_order_and_one_usage_row_matches(
    app: App, simulator: Simulator, stub: ChatServiceAsyncStub, db: psycopg.Connection[Any]
) -> None:
    events = await collect(
        stub,
        request("gpt-4o-mini::chunks=25", tags={"feature": "e2e"}),
    )
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started"
    assert kinds[-1] == "finished"
    assert set(kinds[1:-1]) == {"content"}

    started, finished = events[0].started, events[-1].finished
    assert started.request_id  # generated, since we sent none
    assert started.model == "gpt-4o-mini-2024-07-18"
    assert started.upstream_response_id.startswith("chatcmpl-")

    # The deltas are exactly what the simulator sent, in order.
    record = simulator.requests[-1]
    assert record.content_chunks_sent == 25
    assert "".join(e.content.text for e in events[1:-1]) == text_of(25)
    # The simulator sent all 25 in one write: they arrive together and go out merged.
    assert 1 <= len(events) - 2 < 25

    # The final event carries the upstream-reported usage.
    assert finished.outcome == pb.OUTCOME_COMPLETED
    assert finished.finish_reason == pb.FINISH_REASON_STOP
    assert finished.usage.source == pb.USAGE_SOURCE_REPORTED
    assert finished.usage.output_tokens == 25
    assert finished.usage.input_tokens > 0
    assert finished.usage.total_tokens == finished.usage.input_tokens + 25
    assert finished.cost.HasField("usd_micros") and finished.cost.usd_micros > 0
    assert finished.cost.price_version

    # The upstream saw a streaming request with usage asked for, our key, and our id.
    assert record.body["stream"] is True
    assert record.body["stream_options"] == {"include_usage": True}
    assert record.had_auth
    assert record.headers["x-client-request-id"] == started.request_id

    assert app.ledger is not None
    await app.ledger.flush()
    rows = usage_row(db, started.request_id)
    assert len(rows) == 1
    row = rows[0]
    assert row["user_id"] == "user-42"
    assert row["requested_model"] == "gpt-4o-mini::chunks=25"
    assert row["resolved_model"] == "gpt-4o-mini-2024-07-18"
    assert row["upstream_response_id"] == started.upstream_response_id
    assert row["input_tokens"] == finished.usage.input_tokens
    assert row["output_tokens"] == 25
    assert row["total_tokens"] == finished.usage.total_tokens
    assert row["cost_usd_micros"] == finished.cost.usd_micros
    assert row["usage_source"] == "reported"
    assert row["outcome"] == "completed"
    assert row["grpc_status"] == "OK"
    assert row["finish_reason"] == "stop"
    assert row["attempts"] == 1
    assert row["tags"] == {"feature": "e2e"}
    assert row["ttft_ms"] is not None and row["ttft_ms"] <= row["duration_ms"]
    assert TEST_API_KEY not in json.dumps(row, default=str)


async def test_caller_request_id_is_used_and_request_fields_reach_the_upstream(
    app: App, simulator: Simulator, stub: ChatServiceAsyncStub
) -> None:
    schema = struct_pb2.Struct()
    schema.update({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}})
    req = request(
        request_id="caller-id-123",
        messages=[
            pb.Message(role=pb.ROLE_DEVELOPER, text="Be brief."),
            pb.Message(
                role=pb.ROLE_USER,
                parts=[
                    pb.ContentPart(text="What is this?"),
                    pb.ContentPart(
                        image_url=pb.ImageUrl(url="https://example.com/a.png", detail=pb.IMAGE_DETAIL_LOW)
                    ),
                ],
            ),
        ],
        temperature=0.2,
        top_p=0.9,
        max_completion_tokens=64,
        stop=["END"],
        seed=7,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        response_format=pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(name="answer", schema=schema)),
    )
    events = await collect(stub, req)
    assert events[0].started.request_id == "caller-id-123"
    body = simulator.requests[-1].body
    assert body["messages"] == [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
            ],
        },
    ]
    assert body["temperature"] == 0.2
    assert body["top_p"] == 0.9
    assert body["max_completion_tokens"] == 64
    assert body["stop"] == ["END"]
    assert body["seed"] == 7
    assert body["presence_penalty"] == 0.5
    assert body["frequency_penalty"] == -0.5
    # Whole numbers stay integers on the way through protobuf's Struct.
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {
            "name": "answer",
            "schema": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}},
        },
    }
    assert "user_id" not in body and "tags" not in body


def weather_tool(name: str) -> pb.Tool:
    params = struct_pb2.Struct()
    params.update({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    return pb.Tool(name=name, description="Look up the weather", parameters=params)


def joined_tool_calls(events: list[pb.CompleteResponse]) -> dict[int, dict[str, str]]:
    calls: dict[int, dict[str, str]] = {}
    for e in events:
        if e.WhichOneof("event") == "tool_call":
            d = e.tool_call
            call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            if d.id:
                assert not call["id"], "id must come only on a call's first piece"
                call["id"] = d.id
            if d.name:
                call["name"] = d.name
            call["arguments"] += d.arguments_fragment
    return calls


async def test_tool_call_stream_keeps_ids_names_and_arguments(
    app: App, simulator: Simulator, stub: ChatServiceAsyncStub
) -> None:
    events = await collect(stub, request(tools=[weather_tool("get_weather")]))
    assert simulator.requests[-1].body["tools"][0]["function"]["name"] == "get_weather"
    calls = joined_tool_calls(events)
    assert list(calls) == [0]
    assert calls[0]["id"].startswith("call_")
    assert calls[0]["name"] == "get_weather"
    assert "city" in json.loads(calls[0]["arguments"])
    assert events[-1].finished.finish_reason == pb.FINISH_REASON_TOOL_CALLS


async def test_parallel_tool_calls_arrive_per_index(
    app: App, simulator: Simulator, stub: ChatServiceAsyncStub
) -> None:
    events = await collect(
        stub,
        request("gpt-4o::parallel_tools", tools=[weather_tool("get_weather"), weather_tool("get_forecast")]),
    )
    calls = joined_tool_calls(events)
    assert sorted(calls) == [0, 1]
    assert {c["name"] for c in calls.values()} == {"get_weather", "get_forecast"}
    assert calls[0]["id"] != calls[1]["id"]
    for call in calls.values():
        assert isinstance(json.loads(call["arguments"]), dict)


async def test_assistant_tool_history_is_sent_back_upstream(
    app: App, simulator: Simulator, stub: ChatServiceAsyncStub
) -> None:
    req = request(
        messages=[
            pb.Message(role=pb.ROLE_USER, text="Weather in Paris?"),
            pb.Message(
                role=pb.ROLE_ASSISTANT,
                tool_calls=[pb.ToolCall(id="call_1", name="get_weather", arguments='{"city":"Paris"}')],
            ),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", text='{"temp": 21}'),
        ],
    )
    events = await collect(stub, req)
    assert events[-1].finished.outcome == pb.OUTCOME_COMPLETED
    messages = simulator.requests[-1].body["messages"]
    assert messages[1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            }
        ],
    }
    assert messages[2] == {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"}


async def test_refusal_is_relayed_as_refusal_deltas(
    app: App, simulator: Simulator, stub: ChatServiceAsyncStub
) -> None:
    events = await collect(stub, request("gpt-4o::refusal"))
    refusal = "".join(e.refusal.text for e in events if e.WhichOneof("event") == "refusal")
    assert refusal
    assert not any(e.WhichOneof("event") == "content" for e in events)


async def test_invalid_request_gets_field_violations_and_never_reaches_the_upstream(
    app: App, simulator: Simulator, stub: ChatServiceAsyncStub
) -> None:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    bad = pb.CompleteRequest(model="gpt-4o-mini", messages=[pb.Message(text="hi")], temperature=3)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(stub, bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(info.value)
    assert status is not None
    violations = error_details_pb2.BadRequest()
    assert any(d.Unpack(violations) for d in status.details)
    fields = {v.field for v in violations.field_violations}
    assert {"user_id", "messages[0].role", "temperature"} <= fields
    assert simulator.requests == []


async def test_with_coalescing_off_every_upstream_chunk_is_its_own_message(
    start_app: AppFactory, simulator: Simulator
) -> None:
    app = await start_app(coalesce_deltas=False)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        events = await collect(chat_pb2_grpc.ChatServiceStub(channel), request("gpt-4o-mini::chunks=25"))
    assert [e.WhichOneof("event") for e in events] == ["started", *["content"] * 25, "finished"]
    assert "".join(e.content.text for e in events[1:-1]) == text_of(25)
