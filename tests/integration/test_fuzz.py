"""Fuzzing: arbitrary requests against a real chatgate (simulator upstream, real Postgres).

Whatever a caller sends, the answer is a stream or INVALID_ARGUMENT, RESOURCE_EXHAUSTED
or ALREADY_EXISTS — never INTERNAL or UNKNOWN (a usage query: a page, INVALID_ARGUMENT
or RESOURCE_EXHAUSTED); the server stays healthy, every call that started has exactly
one usage row, and no request id has two. Requests are drawn by hypothesis over the
proto fields (NaN and infinite floats, huge strings, NUL, unknown enum values, nested
Structs, forged page tokens), and raw bytes go through a generic channel. Bounded: a
few hundred calls, about ten seconds.
"""

from __future__ import annotations

import base64
import string
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import struct_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc, usage_pb2, usage_pb2_grpc
from chatgate_server.app import App
from chatgate_server.simulator import Simulator
from chatgate_server.telemetry import NO_TELEMETRY
from tests.integration.conftest import make_settings

FUZZ = settings(
    deadline=None,
    database=None,  # nothing written into the checkout; a failure prints its reproduction blob
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
CALL_TIMEOUT_S = 15.0
COMPLETE = "/chatgate.v1.ChatService/Complete"
GET_USAGE = "/chatgate.v1.UsageService/GetUsage"
STREAM_ANSWERS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
}
USAGE_ANSWERS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


@dataclass
class Env:
    app: App
    channel: grpc.aio.Channel
    started: set[str] = field(default_factory=set)  # request ids that must have exactly one row
    tried: set[str] = field(default_factory=set)  # this run's ids: at most one row each
    calls: int = 0


@pytest.fixture(scope="module")
async def env(migrated_database_url: str) -> AsyncIterator[Env]:
    simulator = Simulator(chunks=4)
    await simulator.start()
    app = App(
        make_settings(migrated_database_url, simulator.base_url, max_request_bytes=256 * 1024),
        telemetry=NO_TELEMETRY,
    )
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            yield Env(app, channel)
    finally:
        await app.stop(0)
        await simulator.stop()


# --- strategies ------------------------------------------------------------------------------

floats = st.floats(allow_nan=True, allow_infinity=True)
int32 = st.integers(-(2**31), 2**31 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)
enums = st.one_of(st.integers(0, 6), int32)  # known values, and any other (proto3 enums are open)
huge = st.sampled_from([300, 3_000, 70_000, 300_000]).map(lambda n: "x" * n)
texts = st.one_of(st.text(max_size=24), st.text(st.characters(codec="utf-8"), max_size=300), huge)
short = st.one_of(st.text(max_size=12), st.sampled_from(["", "a", "\x00", "gpt-4o-mini"]))
not_json = st.sampled_from([float("nan"), float("inf"), float("-inf")])


def json_values(numbers: st.SearchStrategy[float]) -> st.SearchStrategy[Any]:
    leaves = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=16))
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=24,
    )


any_number = st.one_of(floats, not_json)


def structs(numbers: st.SearchStrategy[float] = any_number) -> st.SearchStrategy[struct_pb2.Struct]:
    """Structs of JSON-like values (by default with NaN and infinities), or nested deep."""

    def build(value: dict[str, Any]) -> struct_pb2.Struct:
        out = struct_pb2.Struct()
        out.update(value)
        return out

    deep = st.integers(1, 24).map(lambda n: _nested(n))
    flat = st.dictionaries(st.text(max_size=8), json_values(numbers), max_size=6)
    return st.one_of(flat, deep).map(build)


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"type": "object"}
    for _ in range(depth):
        value = {"properties": value}
    return value


@st.composite
def messages(draw: st.DrawFn) -> pb.Message:
    m = pb.Message(role=draw(st.sampled_from([0, 1, 2, 3, 4, 5, 99])))  # type: ignore[arg-type]
    if draw(st.booleans()):
        m.text = draw(texts)
    else:
        for _ in range(draw(st.integers(0, 3))):
            if draw(st.booleans()):
                m.parts.add(text=draw(short))
            else:
                url = draw(st.one_of(short, st.just("https://example.com/a.png"), st.just("data:image/png;")))
                m.parts.add(image_url=pb.ImageUrl(url=url, detail=draw(enums)))  # type: ignore[arg-type]
    m.name = draw(short)
    m.tool_call_id = draw(short)
    m.refusal = draw(st.one_of(st.just(""), short))
    for _ in range(draw(st.integers(0, 2))):
        m.tool_calls.add(id=draw(short), name=draw(short), arguments=draw(short))
    return m


@st.composite
def tools(draw: st.DrawFn) -> pb.Tool:
    tool = pb.Tool(name=draw(st.one_of(names, short)), description=draw(short))
    if draw(st.booleans()):
        tool.parameters.CopyFrom(draw(structs()))
    if draw(st.booleans()):
        tool.strict = draw(st.booleans())
    return tool


# A request id no call has used: hypothesis repeats drawn values (and across runs), and a
# repeated id is refused (ALREADY_EXISTS) — a fine answer, but not the common case.
FRESH = "<fresh>"
RUN = uuid.uuid4().hex[:8]
FIELDS = (
    "model",
    "user_id",
    "request_id",
    "tags",
    "messages",
    "sampling",
    "max_completion_tokens",
    "stop",
    "tools",
    "tool_choice",
    "response_format",
    "options",
)
names = st.from_regex(r"[a-z_]{1,12}", fullmatch=True)
unit = st.floats(0, 1)


@st.composite
def valid_options(draw: st.DrawFn) -> dict[str, Any]:
    """The newer models' options, each set or not (this one deployment accepts them all)."""
    options = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "reasoning_effort": st.integers(0, 7),
                "verbosity": st.integers(0, 3),
                "service_tier": st.integers(0, 5),
                "prompt_cache_key": st.text(st.characters(categories=("L", "N")), max_size=64),
                "logprobs": st.just(True),
            },
        )
    )
    if options.get("logprobs") and draw(st.booleans()):
        options["top_logprobs"] = draw(st.integers(0, 20))
    return options


def _field_strategies(valid: bool) -> dict[str, st.SearchStrategy[Any]]:
    """Per field, a strategy for values validation accepts, or for anything at all."""
    if valid:
        return {
            "model": st.sampled_from(["gpt-4o-mini", "gpt-4o", "o4-mini"]),
            "user_id": st.one_of(st.just("fuzz-user"), st.text(min_size=1, max_size=40).filter(str.strip)),
            "request_id": st.just(FRESH),
            "tags": st.dictionaries(st.text(min_size=1, max_size=10), st.text(max_size=20), max_size=4),
            "messages": st.lists(
                st.builds(pb.Message, role=st.just(pb.ROLE_USER), text=st.text(min_size=1, max_size=200)),
                min_size=1,
                max_size=3,
            ),
            "sampling": st.fixed_dictionaries(
                {},
                optional={
                    "temperature": st.floats(0, 2),
                    "top_p": unit,
                    "presence_penalty": st.floats(-2, 2),
                    "frequency_penalty": st.floats(-2, 2),
                    "seed": int64,
                },
            ),
            "max_completion_tokens": st.integers(1, 64),
            "stop": st.lists(st.text(min_size=1, max_size=5), max_size=4),
            "tools": st.lists(
                st.builds(
                    pb.Tool,
                    name=names,
                    description=st.text(max_size=20),
                    parameters=structs(st.floats(allow_nan=False, allow_infinity=False)),
                ),
                max_size=2,
            ),
            "tool_choice": st.sampled_from([None, pb.TOOL_CHOICE_MODE_AUTO, pb.TOOL_CHOICE_MODE_NONE]),
            "response_format": st.sampled_from([None, "text", "json_object"]),
            # The newer models' options (the one deployment here accepts them all).
            "options": valid_options(),
        }
    return {
        # "::" is the simulator's own control channel (fault scenarios), not chatgate's surface.
        "model": texts.map(lambda m: m.replace("::", ":")),
        "user_id": texts,
        "request_id": st.one_of(st.just(""), short, texts),
        "tags": st.dictionaries(short, short, max_size=20),
        "messages": st.lists(messages(), max_size=4),
        "sampling": st.fixed_dictionaries(
            {},
            optional={
                "temperature": floats,
                "top_p": floats,
                "presence_penalty": floats,
                "frequency_penalty": floats,
                "seed": int64,
            },
        ),
        "max_completion_tokens": int32,
        "stop": st.lists(short, max_size=6),
        "tools": st.lists(tools(), min_size=1, max_size=3),
        "tool_choice": st.one_of(enums, short),
        "response_format": st.one_of(st.sampled_from(["text", "json_object"]), structs()),
        "options": st.fixed_dictionaries(
            {},
            optional={
                "reasoning_effort": enums,
                "verbosity": enums,
                "service_tier": enums,
                "prompt_cache_key": texts,
                "logprobs": st.booleans(),
                "top_logprobs": int32,
            },
        ),
    }


VALID, WILD = _field_strategies(valid=True), _field_strategies(valid=False)


@st.composite
def complete_requests(draw: st.DrawFn) -> pb.CompleteRequest:
    """A valid request with zero, one or several fields drawn from anything at all: one
    wild field at a time finds what validation misses; all wild finds the rest."""
    mode = draw(st.sampled_from(["valid", "one", "one", "one", "all"]))
    wild = {draw(st.sampled_from(FIELDS))} if mode == "one" else set(FIELDS) if mode == "all" else set()
    v = {name: draw((WILD if name in wild else VALID)[name]) for name in FIELDS}
    req = pb.CompleteRequest(
        model=v["model"],
        user_id=v["user_id"],
        request_id=v["request_id"],
        tags=v["tags"],
        messages=v["messages"],
        stop=v["stop"],
        tools=v["tools"],
        max_completion_tokens=v["max_completion_tokens"],
        **v["sampling"],
        **v["options"],
    )
    choice = v["tool_choice"]
    if isinstance(choice, str):
        req.tool_choice.function_name = choice
    elif choice is not None:
        req.tool_choice.mode = choice
    fmt = v["response_format"]
    if fmt == "text":
        req.response_format.text.SetInParent()
    elif fmt == "json_object":
        req.response_format.json_object.SetInParent()
    elif isinstance(fmt, struct_pb2.Struct):
        req.response_format.json_schema.name = draw(st.one_of(names, short))
        req.response_format.json_schema.schema.CopyFrom(fmt)
    return req


def timestamps() -> st.SearchStrategy[timestamp_pb2.Timestamp]:
    near = int(datetime.now(UTC).timestamp())
    seconds = st.one_of(
        st.integers(near - 30 * 86400, near + 86400),
        st.integers(-62135596800, 253402300799),  # all of Timestamp's range
        int64,
    )
    nanos = st.one_of(st.just(0), st.integers(0, 999_999_999), int32)
    return st.builds(timestamp_pb2.Timestamp, seconds=seconds, nanos=nanos)


USAGE_FIELDS = ("window", "group_by", "tag_key", "user_ids", "models", "tags", "page_size", "page_token")
DIMENSIONS = [
    usage_pb2.USAGE_DIMENSION_TENANT,
    usage_pb2.USAGE_DIMENSION_USER,
    usage_pb2.USAGE_DIMENSION_MODEL,
    usage_pb2.USAGE_DIMENSION_DAY,
]


def _recent(days_ago: float) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(datetime.now(UTC) - timedelta(days=days_ago))
    return out


USAGE_VALID: dict[str, st.SearchStrategy[Any]] = {
    "window": st.tuples(st.floats(1, 30).map(_recent), st.one_of(st.none(), st.just(_recent(0)))),
    "group_by": st.lists(st.sampled_from(DIMENSIONS), unique=True, max_size=3),
    "tag_key": st.just(""),
    "user_ids": st.lists(st.sampled_from(["fuzz-user", "nobody"]), max_size=2),
    "models": st.lists(st.sampled_from(["gpt-4o-mini", "gpt-4o"]), max_size=2),
    "tags": st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=2),
    "page_size": st.integers(0, 5),
    "page_token": st.just(""),
}
USAGE_WILD: dict[str, st.SearchStrategy[Any]] = {
    "window": st.tuples(st.one_of(st.none(), timestamps()), st.one_of(st.none(), timestamps())),
    "group_by": st.lists(enums, max_size=6),
    "tag_key": st.one_of(short, huge),
    "user_ids": st.lists(st.one_of(short, huge), max_size=4),
    "models": st.lists(short, max_size=4),
    "tags": st.dictionaries(short, short, max_size=20),
    "page_size": int32,
    "page_token": st.deferred(lambda: page_tokens()),
}


@st.composite
def usage_requests(draw: st.DrawFn) -> usage_pb2.GetUsageRequest:
    mode = draw(st.sampled_from(["valid", "one", "one", "one", "all"]))
    wild = {draw(st.sampled_from(USAGE_FIELDS))} if mode == "one" else set()
    wild = set(USAGE_FIELDS) if mode == "all" else wild
    v = {name: draw((USAGE_WILD if name in wild else USAGE_VALID)[name]) for name in USAGE_FIELDS}
    start, end = v["window"]
    req = usage_pb2.GetUsageRequest(
        group_by=v["group_by"],
        tag_key=v["tag_key"],
        user_ids=v["user_ids"],
        models=v["models"],
        tags=v["tags"],
        page_size=v["page_size"],
        page_token=v["page_token"],
    )
    if start is not None:
        req.start_time.CopyFrom(start)
    if end is not None:
        req.end_time.CopyFrom(end)
    return req


def page_tokens() -> st.SearchStrategy[str]:
    """Arbitrary text, and well-formed-looking forgeries."""
    b64 = st.binary(max_size=200).map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("="))
    forged = st.tuples(b64, b64).map(".".join)
    return st.one_of(st.text(max_size=40), b64, forged)


# --- the checks ------------------------------------------------------------------------------


@dataclass
class Answer:
    code: grpc.StatusCode
    reason: str = ""
    request_id: str = ""  # from the started event
    details: str = ""


def brief(message: Any) -> str:
    """A failing example as text short enough to read (some carry 300 kB strings)."""
    text = str(message)
    return text if len(text) <= 600 else f"{text[:600]}… ({len(text)} characters)"


def _answer(error: grpc.aio.AioRpcError) -> Answer:
    reason = ""
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            reason = info.reason
    return Answer(error.code(), reason, details=brief(error.details() or ""))


async def complete(env: Env, request: pb.CompleteRequest) -> Answer:
    stub = chat_pb2_grpc.ChatServiceStub(env.channel)
    answer = Answer(grpc.StatusCode.OK)
    env.calls += 1
    if request.request_id == FRESH:
        request.request_id = f"fz-{RUN}-{env.calls}"
    try:
        async for event in stub.Complete(request, timeout=CALL_TIMEOUT_S):
            if event.WhichOneof("event") == "started":
                answer.request_id = event.started.request_id
    except grpc.aio.AioRpcError as error:
        started = answer.request_id
        answer = _answer(error)
        answer.request_id = started
    # Only ids no earlier run can have used are checked: a caller's "a" may have rows
    # from runs more than a request-id window ago.
    ours = request.request_id.startswith(f"fz-{RUN}-")
    if answer.request_id and (ours or not request.request_id):
        env.started.add(answer.request_id)
    elif ours:
        env.tried.add(request.request_id)
    return answer


async def assert_healthy(env: Env) -> None:
    health = health_pb2_grpc.HealthStub(env.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    request = pb.CompleteRequest(
        model="gpt-4o-mini",
        user_id="fuzz-user",
        request_id=f"fz-ok-{uuid.uuid4().hex}",
        messages=[pb.Message(role=pb.ROLE_USER, text="still there?")],
    )
    assert (await complete(env, request)).code == grpc.StatusCode.OK


def row_counts(database_url: str, request_ids: set[str]) -> dict[str, int]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT request_id, count(*) FROM usage_records WHERE request_id = ANY(%s) GROUP BY 1",
            (sorted(request_ids),),
        ).fetchall()
    return {str(r): int(n) for r, n in rows}


# --- the tests -------------------------------------------------------------------------------


@settings(FUZZ, max_examples=150)
@given(request=complete_requests())
async def test_any_complete_request_gets_a_stream_or_a_clear_refusal(
    env: Env, request: pb.CompleteRequest
) -> None:
    answer = await complete(env, request)
    event(f"{answer.code.name} {answer.reason}")  # the mix, with --hypothesis-show-statistics
    assert answer.code in STREAM_ANSWERS, (answer, brief(request))


async def test_after_fuzzing_complete_the_server_is_healthy_and_every_started_call_has_one_row(
    env: Env, migrated_database_url: str
) -> None:
    # A fuzz that never gets past validation tests only validation.
    assert len(env.started) >= env.calls // 10, (len(env.started), env.calls)
    await assert_healthy(env)
    assert env.app.ledger is not None
    await env.app.ledger.wait_stored()
    counts = row_counts(migrated_database_url, env.started | env.tried)
    assert {r: counts.get(r, 0) for r in env.started if counts.get(r, 0) != 1} == {}
    assert {r: n for r, n in counts.items() if n > 1} == {}


@settings(FUZZ, max_examples=150)
@given(request=usage_requests())
async def test_any_usage_query_gets_a_page_or_invalid_argument(
    env: Env, request: usage_pb2.GetUsageRequest
) -> None:
    stub = usage_pb2_grpc.UsageServiceStub(env.channel)
    try:
        await stub.GetUsage(request, timeout=CALL_TIMEOUT_S)
    except grpc.aio.AioRpcError as error:
        answer = _answer(error)
        event(f"{answer.code.name} {answer.reason}")
        assert answer.code in USAGE_ANSWERS, (answer, brief(request))
    else:
        event("OK")


async def test_a_real_page_token_changed_anywhere_is_refused(env: Env) -> None:
    # Two models used in the window, so a page of one group has a next page and a token.
    chat = chat_pb2_grpc.ChatServiceStub(env.channel)
    for model in ("gpt-4o-mini", "gpt-4o"):
        hello = pb.CompleteRequest(
            model=model, user_id="page-token", messages=[pb.Message(role=pb.ROLE_USER, text="hi")]
        )
        async for _ in chat.Complete(hello, timeout=CALL_TIMEOUT_S):
            pass
    assert env.app.ledger is not None
    await env.app.ledger.wait_stored()
    stub = usage_pb2_grpc.UsageServiceStub(env.channel)
    start = timestamp_pb2.Timestamp()
    start.FromDatetime(datetime.now(UTC) - timedelta(days=2))
    request = usage_pb2.GetUsageRequest(
        start_time=start, group_by=[usage_pb2.USAGE_DIMENSION_MODEL], page_size=1
    )
    token = (await stub.GetUsage(request, timeout=CALL_TIMEOUT_S)).next_page_token
    assert token
    alphabet = string.ascii_letters + string.digits + "-_"
    for i in range(0, len(token), max(1, len(token) // 40)):
        if token[i] == ".":
            continue
        request.page_token = token[:i] + alphabet[(alphabet.index(token[i]) + 1) % 64] + token[i + 1 :]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetUsage(request, timeout=CALL_TIMEOUT_S)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# Bytes that are not a CompleteRequest (or GetUsageRequest) at all. The edge decodes
# requests itself and turns these into INVALID_ARGUMENT; gRPC's own deserializer
# answered UNKNOWN or INTERNAL.
def _deep_struct_bytes(depth: int) -> bytes:
    """A CompleteRequest whose tool parameters nest ``depth`` Structs: {"a": {"a": …}}."""
    struct = b""
    for _ in range(depth):
        value = b"\x2a" + _varint(len(struct)) + struct  # Value.struct_value (5)
        entry = b"\x0a\x01a\x12" + _varint(len(value)) + value  # map entry: key 1, value 2
        struct = b"\x0a" + _varint(len(entry)) + entry  # Struct.fields (1)
    tool = b"\x0a\x01f\x1a" + _varint(len(struct)) + struct  # Tool.name (1), .parameters (3)
    return b"\x6a" + _varint(len(tool)) + tool  # CompleteRequest.tools (13)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


UNDECODABLE = {
    "truncated-varint": b"\x30\xff\xff",
    "truncated-length": b"\x0a\x10abc",
    "invalid-utf8-model": b"\x0a\x02\xff\xfe",
    "bad-wire-type": b"\x0f",
    "struct-past-the-nesting-limit": _deep_struct_bytes(200),
}


@pytest.mark.parametrize("method", [COMPLETE, GET_USAGE])
@pytest.mark.parametrize("payload", list(UNDECODABLE.values()), ids=list(UNDECODABLE))
async def test_undecodable_bytes_are_invalid_argument(env: Env, method: str, payload: bytes) -> None:
    code = await raw_call(env, method, payload)
    assert code == grpc.StatusCode.INVALID_ARGUMENT


@settings(FUZZ, max_examples=100)
@given(payload=st.binary(max_size=512), method=st.sampled_from([COMPLETE, GET_USAGE]))
async def test_any_bytes_get_an_answer_from_the_error_model(env: Env, payload: bytes, method: str) -> None:
    code = await raw_call(env, method, payload)
    allowed = STREAM_ANSWERS if method == COMPLETE else USAGE_ANSWERS
    assert code in allowed, (code, payload[:200])


async def test_after_raw_bytes_the_server_is_healthy(env: Env) -> None:
    await assert_healthy(env)


async def raw_call(env: Env, method: str, payload: bytes) -> grpc.StatusCode:
    identity = lambda b: b  # noqa: E731 - the bytes go out as they are
    try:
        if method == COMPLETE:
            call = env.channel.unary_stream(
                method, request_serializer=identity, response_deserializer=identity
            )
            async for _ in call(payload, timeout=CALL_TIMEOUT_S):
                pass
        else:
            unary = env.channel.unary_unary(
                method, request_serializer=identity, response_deserializer=identity
            )
            await unary(payload, timeout=CALL_TIMEOUT_S)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK
