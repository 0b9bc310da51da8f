"""The simulator as an integration-test upstream: structured output, tool loops that end,
a model list with context windows — over real sockets, directly and through chatgate."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import orjson
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from chatgate.v1 import chat_pb2 as pb
from chatgate_server.simulator import Simulator
from chatgate_server.simulator.testing import content_of, sse_chunks
from tests.schema_check import problems

if TYPE_CHECKING:
    from chatgate.v1.chat_pb2_grpc import ChatServiceAsyncStub

KEY = "sk-test-secret-0123456789"
USER = [{"role": "user", "content": "Extract the order."}]
ORDER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "customer": {"type": "string"},
        "priority": {"type": "string", "enum": ["low", "high"]},
        "lines": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
        },
        "total": {"type": "number"},
        "gift": {"type": "boolean"},
    },
    "required": ["customer", "priority", "lines", "total", "gift"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "order", "strict": True, "schema": ORDER_SCHEMA},
}
WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS}}


@pytest.fixture
async def http(simulator: Simulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=simulator.base_url, headers={"authorization": f"Bearer {KEY}"}, timeout=10
    ) as client:
        yield client


async def post(http: httpx.AsyncClient, **body: Any) -> httpx.Response:
    body.setdefault("model", "gpt-4o-mini")
    body.setdefault("messages", USER)
    return await http.post("/chat/completions", json=body)


# --- structured output -----------------------------------------------------------------


async def test_json_schema_answers_parse_and_fit_the_schema(http: httpx.AsyncClient) -> None:
    streamed = await post(http, stream=True, response_format=JSON_SCHEMA_FORMAT)
    text = content_of(sse_chunks(streamed.text))
    assert problems(json.loads(text), ORDER_SCHEMA) == [], text

    whole = (await post(http, response_format=JSON_SCHEMA_FORMAT)).json()
    assert whole["choices"][0]["message"]["content"] == text  # deterministic
    assert whole["usage"]["completion_tokens"] > 0

    obj = (await post(http, response_format={"type": "json_object"})).json()
    assert isinstance(json.loads(obj["choices"][0]["message"]["content"]), dict)


async def test_a_json_answer_cut_by_max_tokens_says_length(http: httpx.AsyncClient) -> None:
    body = (await post(http, response_format=JSON_SCHEMA_FORMAT, max_completion_tokens=3)).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    assert choice["message"]["content"].startswith('{"customer":')  # the JSON, cut short
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice["message"]["content"])


# --- tool loops -------------------------------------------------------------------------


async def test_a_tool_loop_ends_with_text(http: httpx.AsyncClient) -> None:
    messages: list[dict[str, Any]] = list(USER)
    for _ in range(5):
        message = (await post(http, messages=messages, tools=[WEATHER_TOOL])).json()["choices"][0]["message"]
        messages.append(message)
        if not message.get("tool_calls"):
            break
        messages += [
            {"role": "tool", "tool_call_id": call["id"], "content": '{"temp_c": 21}'}
            for call in message["tool_calls"]
        ]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[-1]["content"]


# --- models and context windows ---------------------------------------------------------


async def test_an_unknown_model_is_404_model_not_found(http: httpx.AsyncClient) -> None:
    response = await post(http, model="gpt-4o-minii::chunks=2")
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": "The model `gpt-4o-minii` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    }
    assert (await post(http, model="gpt-4o-mini-2024-07-18")).status_code == 200


async def test_a_prompt_over_the_context_window_is_400_context_length_exceeded(
    http: httpx.AsyncClient,
) -> None:
    long = [{"role": "user", "content": "word " * 8000}]  # ~10k tokens: over gpt-4's 8192
    response = await post(http, model="gpt-4", messages=long)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        "messages",
        "context_length_exceeded",
    )
    assert error["message"].startswith("This model's maximum context length is 8192 tokens. However, your ")
    assert error["message"].endswith("Please reduce the length of the messages.")
    assert (await post(http, model="gpt-4o", messages=long)).status_code == 200

    # The prompt fits, but not with the completion room asked for.
    short = [{"role": "user", "content": "word " * 4000}]
    response = await post(http, model="gpt-4", messages=short, max_tokens=6000)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "in the messages, 6000 in the completion)" in message
    assert message.endswith("Please reduce the length of the messages or completion.")


async def test_any_model_serves_every_name() -> None:
    async with Simulator(any_model=True) as sim, httpx.AsyncClient(base_url=sim.base_url) as client:
        body = {"model": "my-model", "messages": USER}
        response = await client.post("/chat/completions", json=body, headers={"authorization": "Bearer k"})
        assert response.status_code == 200
        assert response.json()["model"] == "my-model"


# --- through chatgate -------------------------------------------------------------------


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


async def collect(stub: ChatServiceAsyncStub, req: pb.CompleteRequest) -> list[pb.CompleteResponse]:
    return [event async for event in stub.Complete(req, timeout=30)]


async def test_through_chatgate_json_schema_output_fits(stub: ChatServiceAsyncStub) -> None:
    fmt = pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(name="order", schema=struct(ORDER_SCHEMA)))
    req = pb.CompleteRequest(
        model="gpt-4o-mini",
        user_id="u",
        messages=[pb.Message(role=pb.ROLE_USER, text="x")],
        response_format=fmt,
    )
    events = await collect(stub, req)
    text = "".join(e.content.text for e in events if e.WhichOneof("event") == "content")
    assert problems(orjson.loads(text), ORDER_SCHEMA) == [], text


async def test_through_chatgate_a_tool_loop_ends(stub: ChatServiceAsyncStub) -> None:
    tool = pb.Tool(name="get_weather", parameters=struct(WEATHER_PARAMETERS))
    messages = [pb.Message(role=pb.ROLE_USER, text="Weather in Paris?")]
    for _ in range(5):
        events = await collect(
            stub, pb.CompleteRequest(model="gpt-4o", user_id="u", messages=messages, tools=[tool])
        )
        calls = [e.tool_call for e in events if e.WhichOneof("event") == "tool_call"]
        if not calls:
            break
        call_id = next(c.id for c in calls if c.id)
        arguments = "".join(c.arguments_fragment for c in calls)
        messages += [
            pb.Message(
                role=pb.ROLE_ASSISTANT,
                tool_calls=[pb.ToolCall(id=call_id, name="get_weather", arguments=arguments)],
            ),
            pb.Message(role=pb.ROLE_TOOL, tool_call_id=call_id, text='{"temp_c": 21}'),
        ]
    assert len(messages) == 3  # one round of tools, then the answer
    assert any(e.WhichOneof("event") == "content" for e in events)
    assert events[-1].finished.finish_reason == pb.FINISH_REASON_STOP


@pytest.mark.parametrize(
    ("model", "text", "code"),
    [("gpt-4o-minii", "hi", "MODEL_NOT_FOUND"), ("gpt-4", "word " * 8000, "CONTEXT_LENGTH_EXCEEDED")],
)
async def test_through_chatgate_model_errors_are_invalid_argument(
    stub: ChatServiceAsyncStub, model: str, text: str, code: str
) -> None:
    req = pb.CompleteRequest(model=model, user_id="u", messages=[pb.Message(role=pb.ROLE_USER, text=text)])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(stub, req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The upstream's own code never reaches the caller; chatgate names the cause.
    status = rpc_status.from_call(info.value)
    assert status is not None
    causes = []
    for detail in status.details:
        error_info = error_details_pb2.ErrorInfo()
        if detail.Unpack(error_info):
            causes.append(error_info.metadata["cause"])
    assert causes == [code]
