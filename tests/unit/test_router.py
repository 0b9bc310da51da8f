"""The router's choices per attempt, with fake adapters, a fake clock and a scripted rng."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from chatgate_server.deadline import Deadline
from chatgate_server.domain import ChatMessage, CompletionRequest, Feature
from chatgate_server.errors import (
    BreakerOpen,
    InvalidRequest,
    TooManyStreams,
    UpstreamCredentialsError,
    UpstreamError,
    UpstreamRejected,
)
from chatgate_server.upstream.base import UpstreamStream
from chatgate_server.upstream.breaker import BreakerState, CircuitBreaker
from chatgate_server.upstream.deployment import Deployment
from chatgate_server.upstream.retry import RetryPolicy, decide
from chatgate_server.upstream.router import Route, Router


class FakeUpstream:
    name = "openai"

    async def open(self, request: CompletionRequest, deadline: Deadline) -> UpstreamStream:
        raise AssertionError("the router never opens streams")

    async def aclose(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def deployment(name: str, clock: Clock, **kwargs: object) -> Deployment:
    breaker = CircuitBreaker(name, failure_threshold=1, failure_rate=0.0, cooldown_s=10.0, clock=clock)
    return Deployment(name, FakeUpstream(), breaker, **kwargs)  # type: ignore[arg-type]


def request(model: str = "gpt-4o") -> CompletionRequest:
    return CompletionRequest(
        request_id="r", model=model, messages=(ChatMessage(role="user", content="hi"),), user_id="u"
    )


def open_breaker(d: Deployment) -> None:
    d.breaker.acquire().failure()
    assert d.breaker.state is BreakerState.OPEN


def test_one_deployment_keeps_one_permit_across_retries() -> None:
    clock = Clock()
    a = deployment("a", clock)
    plan = Router([a]).plan("gpt-4o")
    first = plan.next()
    plan.failed(UpstreamError("500"))
    assert not plan.would_move()  # a retry on the same deployment: backoff applies
    assert plan.next() is first and a.breaker.in_flight == 1 and a.in_flight == 1
    plan.judged(failure=True)
    assert a.breaker.state is BreakerState.OPEN and a.in_flight == 0  # one call, one failure


def test_a_failure_moves_to_the_next_deployment_and_judges_the_one_left() -> None:
    clock = Clock()
    a, b = deployment("a", clock), deployment("b", clock)
    plan = Router([a, b], {"m": Route("m", "gpt-4o", (a, b))}).plan("m")
    assert plan.next().deployment is a
    plan.failed(UpstreamError("503"))
    assert plan.would_move()
    assert plan.next().deployment is b
    assert a.breaker.state is BreakerState.OPEN and a.in_flight == 0  # judged on leaving
    plan.succeeded()
    assert b.breaker.state is BreakerState.CLOSED and b.breaker.in_flight == 0


def test_a_caller_mistake_on_leaving_does_not_count() -> None:
    clock = Clock()
    a, b = deployment("a", clock), deployment("b", clock)
    plan = Router([a, b], {"m": Route("m", "gpt-4o", (a, b))}).plan("m")
    plan.next()
    plan.failed(UpstreamCredentialsError("our key for a"))
    plan.next()
    assert a.breaker.state is BreakerState.CLOSED and a.breaker.in_flight == 0


def test_after_each_was_tried_the_call_comes_round_again() -> None:
    clock = Clock()
    a, b = deployment("a", clock), deployment("b", clock)
    plan = Router([a, b], {"m": Route("m", "gpt-4o", (a, b))}).plan("m")
    seen = []
    for _ in range(4):
        seen.append(plan.next().deployment.name)
        plan.failed(UpstreamRejected("not the deployment's fault"))
    assert seen == ["a", "b", "a", "b"]


def test_an_open_breaker_is_passed_over_and_all_open_gives_the_earliest_reopen() -> None:
    clock = Clock()
    a, b = deployment("a", clock), deployment("b", clock)
    router = Router([a, b], {"m": Route("m", "gpt-4o", (a, b))})
    open_breaker(a)
    assert router.plan("m").next().deployment is b
    clock.now += 4
    open_breaker(b)  # a reopens in 6 s, b in 10 s
    with pytest.raises(BreakerOpen) as refused:
        router.plan("m").next()
    assert refused.value.retry_after == pytest.approx(6.0)
    assert router.plan("m").breaker_state is BreakerState.OPEN


def test_a_deployment_at_its_stream_limit_is_passed_over() -> None:
    clock = Clock()
    a, b = deployment("a", clock, max_concurrent_streams=1), deployment("b", clock, max_concurrent_streams=1)
    router = Router([a, b], {"m": Route("m", "gpt-4o", (a, b))})
    held = router.plan("m")
    assert held.next().deployment is a
    assert router.plan("m").next().deployment is b
    with pytest.raises(TooManyStreams):
        router.plan("m").next()
    held.succeeded()
    assert a.in_flight == 0 and router.plan("m").next().deployment is a


def test_models_map_to_each_deployments_own_name_and_fallback_comes_last() -> None:
    clock = Clock()
    openai = deployment("openai", clock, models={"gpt-4o": "gpt-4o", "gpt-4o-mini": "gpt-4o-mini"})
    azure = deployment("azure", clock, models={"gpt-4o": "prod-4o"})
    routes = {"fast": Route("fast", "gpt-4o", (azure, openai), fallback="gpt-4o-mini")}
    plan = Router([openai, azure], routes).plan("fast")
    asked = []
    for _ in range(3):
        leg = plan.next()
        asked.append((leg.deployment.name, leg.request(request("fast")).model, leg.candidate.fallback))
        plan.failed(UpstreamError("500"))
    assert asked == [
        ("azure", "prod-4o", None),
        ("openai", "gpt-4o", None),
        ("openai", "gpt-4o-mini", "gpt-4o-mini"),  # the fallback says it is one
    ]


def test_an_unserved_model_is_an_invalid_request() -> None:
    a = deployment("a", Clock(), models={"gpt-4o": "gpt-4o"})
    with pytest.raises(InvalidRequest):
        Router([a]).plan("gpt-5")


def test_a_call_setting_an_option_goes_only_to_deployments_that_accept_it() -> None:
    clock = Clock()
    plain = deployment("plain", clock, accepts=frozenset())
    full = deployment("full", clock)  # accepts every option by default
    reasoning = deployment("reasoning", clock, accepts=frozenset({"reasoning_effort"}))
    router = Router([plain, full, reasoning], {"m": Route("m", "gpt-4o", (plain, reasoning, full))})
    assert [c.deployment.name for c in router.plan("m").candidates] == ["plain", "reasoning", "full"]
    needs: frozenset[Feature] = frozenset({"reasoning_effort"})
    assert [c.deployment.name for c in router.plan("m", needs).candidates] == ["reasoning", "full"]
    needs = frozenset({"reasoning_effort", "logprobs"})
    assert [c.deployment.name for c in router.plan("m", needs).candidates] == ["full"]


def test_when_no_deployment_of_the_route_accepts_an_option_the_field_is_named() -> None:
    clock = Clock()
    plain = deployment("plain", clock, accepts=frozenset())
    reasoning = deployment("reasoning", clock, accepts=frozenset({"reasoning_effort"}))
    logprobs = deployment("logprobs", clock, accepts=frozenset({"logprobs"}))
    router = Router(
        [plain, reasoning, logprobs],
        {
            "m": Route("m", "gpt-4o", (plain, reasoning)),
            "both": Route("both", "gpt-4o", (reasoning, logprobs)),
        },
    )
    with pytest.raises(InvalidRequest) as refused:
        router.plan("m", frozenset({"logprobs", "verbosity", "reasoning_effort"}))
    assert [(v.field, v.description) for v in refused.value.violations] == [
        ("verbosity", "no deployment serving model m accepts verbosity"),
        ("logprobs", "no deployment serving model m accepts logprobs"),
    ]
    # Each accepted somewhere, but no one deployment takes both.
    with pytest.raises(InvalidRequest) as refused:
        router.plan("both", frozenset({"logprobs", "reasoning_effort"}))
    assert {v.description for v in refused.value.violations} == {
        "no deployment serving model both accepts reasoning_effort, logprobs together"
    }


def test_weights_share_the_first_place() -> None:
    clock = Clock()
    a, b = deployment("a", clock, weight=3), deployment("b", clock, weight=1)
    points = itertools.cycle(i / 100 for i in range(100))
    router = Router([a, b], {"m": Route("m", "gpt-4o", (a, b), weighted=True)}, rng=lambda: next(points))
    first: Counter[str] = Counter()
    for _ in range(400):
        plan = router.plan("m")
        first[plan.candidates[0].deployment.name] += 1
    assert first == {"a": 300, "b": 100}


def test_a_failover_goes_at_once_and_counts_against_the_one_budget() -> None:
    policy = RetryPolicy(max_attempts=3)
    limited = UpstreamError("429", retry_after=5.0)
    assert decide(limited, 1, 30.0, policy, failover=True).wait_s == 0.0
    assert decide(limited, 1, 30.0, policy, failover=False).wait_s == 5.0
    assert not decide(limited, 3, 30.0, policy, failover=True).retry  # budget spent
    # Our key or billing at one deployment: another deployment may serve the call.
    assert decide(UpstreamCredentialsError("key"), 1, 30.0, policy, failover=True).retry
    assert not decide(UpstreamCredentialsError("key"), 1, 30.0, policy, failover=False).retry
    assert not decide(UpstreamRejected("bad request"), 1, 30.0, policy, failover=True).retry


def test_a_missing_azure_deployment_is_the_callers_mistake_only_when_the_name_was_theirs() -> None:
    from chatgate_server.errors import UpstreamMisconfigured

    clock = Clock()
    passthrough = deployment("azure-any", clock)  # models: "*" (each caller's name sent as is)
    mapped = deployment("azure-mapped", clock, models={"fast": "prod-mini"})
    routes = {"alias": Route("alias", "gpt-4o", (passthrough,))}
    # Both serve "fast" (one by "*"): a draw past the middle puts the mapped one first.
    router = Router([passthrough, mapped], routes, rng=lambda: 0.75)

    def judged(model: str) -> BaseException:
        missing = UpstreamMisconfigured("misconfigured", problem="DeploymentNotFound", names_deployment=True)
        return router.plan(model).next().judge(missing)

    mistake = judged("gpt-4o-typo")  # the caller's name reached Azure as a deployment name
    assert isinstance(mistake, UpstreamRejected) and mistake.cause == "MODEL_NOT_FOUND"
    assert isinstance(judged("fast"), UpstreamMisconfigured)  # chatgate.toml chose "prod-mini"
    assert isinstance(judged("alias"), UpstreamMisconfigured)  # a route chose "gpt-4o"
    wrong_version = UpstreamMisconfigured("misconfigured", problem="api-version")
    assert router.plan("gpt-4o-typo").next().judge(wrong_version) is wrong_version  # never the caller's
