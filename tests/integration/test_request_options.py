"""The newer request options end to end, over sockets: chatgate with a chatgate.toml of
two simulator deployments that accept different options.

- the body the chosen simulator received carries each option under OpenAI's name;
- a call that sets an option goes only to a deployment that accepts it, and is refused
  with INVALID_ARGUMENT naming the field when none of its route's deployments does;
- log-probabilities asked for reach the caller in the content deltas;
- the tier the upstream says served the call lands in the usage row.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import psycopg
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from chatgate.v1 import chat_pb2 as pb
from chatgate_server.simulator import Simulator
from tests.integration import test_routing
from tests.integration.test_routing import M, Sims, StartRouted, deployment, route

# The routing tests' fixtures: simulators on port 0, chatgate with a chatgate.toml.
sims = test_routing.sims
start_routed = test_routing.start_routed


def ask(model: str, user: str = "u-1", **options: Any) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model=model, user_id=user, messages=[pb.Message(role=pb.ROLE_USER, text="hi")], **options
    )


def accepts(*features: str) -> str:
    return "[" + ", ".join(f'"{f}"' for f in features) + "]"


async def two_deployments(sims: Sims, start_routed: StartRouted) -> tuple[Any, Any, Any, Any]:
    """``plain`` (a compatible server that accepts no option) first, ``full`` (kind
    openai: every option) second; route ``m`` tries them in that order, ``only-plain``
    has only ``plain``."""
    plain_sim, full_sim = await sims(2)
    app, stub = await start_routed(
        deployment("plain", plain_sim.base_url, {"m": M, "only-plain": M}, kind="compatible"),
        deployment("full", full_sim.base_url, {"m": M}),
        route("m", "plain", "full"),
        route("only-plain", "plain"),
    )
    return app, stub, plain_sim, full_sim


async def test_options_go_only_to_a_deployment_that_accepts_them_with_their_openai_names(
    sims: Sims, start_routed: StartRouted
) -> None:
    _, stub, plain, full = await two_deployments(sims, start_routed)
    events = [e async for e in stub.Complete(ask("m"), timeout=10)]
    assert events[-1].finished.deployment == "plain"  # nothing set: the route's first
    options: dict[str, Any] = {
        "reasoning_effort": pb.REASONING_EFFORT_LOW,
        "verbosity": pb.VERBOSITY_HIGH,
        "service_tier": pb.SERVICE_TIER_PRIORITY,
        "prompt_cache_key": "summaries-v2",
    }
    events = [e async for e in stub.Complete(ask("m", **options), timeout=10)]
    assert events[-1].finished.deployment == "full"
    assert (len(plain.requests), len(full.requests)) == (1, 1)
    body = full.requests[0].body
    assert {k: body.get(k) for k in options} == {
        "reasoning_effort": "low",
        "verbosity": "high",
        "service_tier": "priority",
        "prompt_cache_key": "summaries-v2",
    }
    assert not {"reasoning_effort", "verbosity", "service_tier", "prompt_cache_key"} & set(
        plain.requests[0].body
    )


async def test_a_route_whose_deployments_cannot_honour_an_option_refuses_the_call_naming_it(
    sims: Sims, start_routed: StartRouted
) -> None:
    _, stub, plain, full = await two_deployments(sims, start_routed)
    call = stub.Complete(
        ask("only-plain", reasoning_effort=pb.REASONING_EFFORT_HIGH, logprobs=True), timeout=10
    )
    try:
        async for _ in call:
            raise AssertionError("no event may come")
    except grpc.aio.AioRpcError as exc:
        refused = exc
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    status: status_pb2.Status | None = rpc_status.from_call(refused)
    assert status is not None
    violations = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            violations = [(v.field, v.description) for v in bad.field_violations]
    assert violations == [
        ("reasoning_effort", "no deployment serving model only-plain accepts reasoning_effort"),
        ("logprobs", "no deployment serving model only-plain accepts logprobs"),
    ]
    assert "only-plain accepts reasoning_effort" in (refused.details() or "")
    assert (len(plain.requests), len(full.requests)) == (0, 0)  # refused before any upstream call


async def test_a_compatible_deployment_takes_the_options_its_accepts_lists(
    sims: Sims, start_routed: StartRouted
) -> None:
    (sim,) = await sims(1)
    _, stub = await start_routed(
        deployment("vllm", sim.base_url, {"m": M}, kind="compatible", accepts=["logprobs"]),
        route("m", "vllm"),
    )
    events = [e async for e in stub.Complete(ask("m", logprobs=True, top_logprobs=1), timeout=10)]
    assert events[-1].finished.deployment == "vllm"
    assert (sim.requests[0].body["logprobs"], sim.requests[0].body["top_logprobs"]) == (True, 1)
    refused = stub.Complete(ask("m", verbosity=pb.VERBOSITY_LOW), timeout=10)
    try:
        [e async for e in refused]
        raise AssertionError("verbosity is not accepted by vllm")
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no deployment serving model m accepts verbosity" in (exc.details() or "")


async def test_log_probabilities_reach_the_caller_token_by_token(
    sims: Sims, start_routed: StartRouted
) -> None:
    _, stub, _, _ = await two_deployments(sims, start_routed)
    events = [e async for e in stub.Complete(ask("m", logprobs=True, top_logprobs=2), timeout=10)]
    content = [e.content for e in events if e.WhichOneof("event") == "content"]
    text = "".join(c.text for c in content)
    tokens = [t for c in content for t in c.logprobs]
    assert text and "".join(t.token for t in tokens) == text  # every token, in order
    assert all(t.token_bytes == t.token.encode() for t in tokens)
    assert all(t.logprob < 0 for t in tokens)
    assert [len(t.top_logprobs) for t in tokens] == [2] * len(tokens)
    assert all(t.top_logprobs[0].token == t.token and t.top_logprobs[1].token == " alt1" for t in tokens)
    assert events[-1].finished.deployment == "full"
    # Without logprobs, none come.
    plain_events = [e async for e in stub.Complete(ask("m"), timeout=10)]
    assert not any(e.content.logprobs for e in plain_events if e.WhichOneof("event") == "content")


async def test_the_tier_that_served_the_call_is_in_the_usage_row(
    sims: Sims, start_routed: StartRouted, db: psycopg.Connection[tuple[object, ...]]
) -> None:
    _, stub, _, _ = await two_deployments(sims, start_routed)
    user = f"u-{uuid.uuid4().hex[:8]}"
    for tier in (pb.SERVICE_TIER_AUTO, pb.SERVICE_TIER_FLEX, pb.SERVICE_TIER_UNSPECIFIED):
        [e async for e in stub.Complete(ask("m", user, service_tier=tier), timeout=10)]

    def rows() -> list[tuple[object, ...]]:
        query = "SELECT deployment, service_tier FROM usage_records WHERE user_id = %s ORDER BY started_at"
        return db.execute(query, [user]).fetchall()

    for _ in range(100):
        if len(rows()) == 3:
            break
        await asyncio.sleep(0.05)
    # "auto" is served in the project's default tier, and the upstream says so; a call
    # that names no tier goes to the first deployment, whose chunks name none.
    assert rows() == [("full", "default"), ("full", "flex"), ("plain", None)]


async def test_an_azure_deployment_takes_the_options_but_service_tier_unless_listed(
    start_routed: StartRouted,
) -> None:
    """Against the simulator in Azure mode: the options reach the deployment's URL with the
    api-key header; service_tier (not in Azure's default accepts) is refused by a route of
    Azure deployments only, and served once a deployment lists it."""
    async with (
        Simulator(flavor="azure", deployments={"mini-prod": M}) as plain,
        Simulator(flavor="azure", deployments={"mini-prio": M}) as priority,
    ):
        _, stub = await start_routed(
            deployment(
                "azure",
                plain.root_url,
                {"m": "mini-prod", "az": "mini-prod"},
                kind="azure",
                api_version="2024-10-21",
            ),
            deployment(
                "azure-prio",
                priority.root_url,
                {"m": "mini-prio"},
                kind="azure",
                api_version="2024-10-21",
                accepts=["service_tier", "logprobs"],
            ),
            route("m", "azure", "azure-prio"),
            route("az", "azure"),
        )
        events = [
            e async for e in stub.Complete(ask("m", reasoning_effort=pb.REASONING_EFFORT_HIGH), timeout=10)
        ]
        assert events[-1].finished.deployment == "azure"
        [seen] = plain.requests
        assert seen.deployment == "mini-prod" and seen.body["reasoning_effort"] == "high"
        events = [e async for e in stub.Complete(ask("m", service_tier=pb.SERVICE_TIER_PRIORITY), timeout=10)]
        assert events[-1].finished.deployment == "azure-prio"
        assert priority.requests[0].body["service_tier"] == "priority"
        try:
            [e async for e in stub.Complete(ask("az", service_tier=pb.SERVICE_TIER_PRIORITY), timeout=10)]
            raise AssertionError("no deployment of az accepts service_tier")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "no deployment serving model az accepts service_tier" in (exc.details() or "")
        assert (len(plain.requests), len(priority.requests)) == (1, 1)


async def test_a_bad_option_value_is_invalid_argument_before_any_upstream_call(
    sims: Sims, start_routed: StartRouted
) -> None:
    _, stub, plain, full = await two_deployments(sims, start_routed)
    bad = ask("m", prompt_cache_key="k" * 65, top_logprobs=3, verbosity=9)
    try:
        [e async for e in stub.Complete(bad, timeout=10)]
        raise AssertionError("the request is invalid")
    except grpc.aio.AioRpcError as exc:
        refused = exc
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(refused)
    assert status is not None
    fields = set()
    for detail in status.details:
        request = error_details_pb2.BadRequest()
        if detail.Unpack(request):
            fields = {v.field for v in request.field_violations}
    assert fields == {"prompt_cache_key", "top_logprobs", "verbosity"}
    assert (len(plain.requests), len(full.requests)) == (0, 0)
