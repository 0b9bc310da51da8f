"""Invalid requests: INVALID_ARGUMENT with field violations, and nothing reaches the upstream."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.simulator import Simulator
from tests.integration.conftest import AppFactory

USER = pb.Message(role=pb.ROLE_USER, text="hi")


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


def base(**fields: Any) -> pb.CompleteRequest:
    fields.setdefault("model", "gpt-4o-mini")
    fields.setdefault("user_id", "u1")
    fields.setdefault("messages", [USER])
    return pb.CompleteRequest(**fields)


CASES = [
    (base(messages=[]), "messages"),
    (base(messages=[pb.Message(text="no role")]), "messages[0].role"),
    (base(messages=[pb.Message(role=99, text="odd role")]), "messages[0].role"),  # type: ignore[arg-type]
    (base(user_id=""), "user_id"),
    (base(model=""), "model"),
    (base(temperature=2.5), "temperature"),
    (base(temperature=float("nan")), "temperature"),
    (base(top_p=1.5), "top_p"),
    (base(presence_penalty=-3), "presence_penalty"),
    (base(frequency_penalty=2.01), "frequency_penalty"),
    (base(max_completion_tokens=0), "max_completion_tokens"),
    (base(max_completion_tokens=-5), "max_completion_tokens"),
    (base(messages=[USER, pb.Message(role=pb.ROLE_TOOL, text="42")]), "messages[1].tool_call_id"),
    (base(request_id="has spaces"), "request_id"),
    (base(stop=["a", "b", "c", "d", "e"]), "stop"),
    (base(tools=[pb.Tool(name="bad name!")]), "tools[0].name"),
    (base(tool_choice=pb.ToolChoice(function_name="missing")), "tool_choice.function_name"),
    (
        base(messages=[pb.Message(role=pb.ROLE_USER, text="a", parts=[pb.ContentPart(text="b")])]),
        "messages[0]",
    ),
    (base(model="gpt-3.5-turbo"), "model"),  # outside the allow-list below
    # Every string that reaches the usage row is bounded.
    (base(user_id="u" * 257), "user_id"),
    (base(request_id="r" * 129), "request_id"),
    (base(tags={f"k{i}": "v" for i in range(17)}), "tags"),
    (base(tags={"k" * 65: "v"}), f"tags[{'k' * 64}]"),
    (base(tags={"k": "v" * 257}), "tags[k]"),
    # Allowed by the glob, but 3,000 characters once made a row Postgres could not index.
    (base(model="gpt-4o-" + "x" * 250), "model"),
    (base(tools=[pb.Tool(name="f", parameters=struct({"maximum": float("nan")}))]), "tools[0].parameters"),
    (
        base(tools=[pb.Tool(name="f", parameters=struct({"enum": [1, {"x": float("-inf")}]}))]),
        "tools[0].parameters",
    ),
    (
        base(
            response_format=pb.ResponseFormat(
                json_schema=pb.JsonSchemaFormat(name="s", schema=struct({"minimum": float("inf")}))
            )
        ),
        "response_format.json_schema.schema",
    ),
    (base(messages=[pb.Message(role=pb.ROLE_USER, text="x" * 5000)]), ""),  # over the size limit
]


@pytest.mark.parametrize(
    ("request_msg", "field"), CASES, ids=[f"{i}-{f or 'size'}" for i, (_, f) in enumerate(CASES)]
)
async def test_rejected_before_any_upstream_call(
    start_app: AppFactory, simulator: Simulator, request_msg: pb.CompleteRequest, field: str
) -> None:
    app = await start_app(max_request_bytes=4096, allowed_models=("gpt-4o*", "o4-mini"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Complete(request_msg, timeout=5):
                pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(info.value)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad_request) for d in status.details)
    assert field in {v.field for v in bad_request.field_violations}
    assert all(v.description for v in bad_request.field_violations)
    assert simulator.requests == []


async def test_allowed_models_and_size_pass(start_app: AppFactory, simulator: Simulator) -> None:
    app = await start_app(max_request_bytes=4096, allowed_models=("gpt-4o*", "o4-mini"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        events = [e async for e in stub.Complete(base(model="gpt-4o-mini"), timeout=5)]
    assert events[-1].finished.outcome == pb.OUTCOME_COMPLETED
    assert len(simulator.requests) == 1


async def test_a_fine_tuned_model_name_fits_the_cap(start_app: AppFactory, simulator: Simulator) -> None:
    app = await start_app()
    model = "ft:gpt-4o-mini-2024-07-18:a-rather-long-organisation-name:" + "s" * 64 + ":9Ab3dEfG"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        events = [e async for e in stub.Complete(base(model=model), timeout=5)]
    assert events[-1].finished.outcome == pb.OUTCOME_COMPLETED
    assert simulator.requests[0].body["model"] == model
