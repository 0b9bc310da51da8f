"""The router's choices per attempt, with fake adapters, a fake clock and a scripted rng."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from chatgate_server.deadline import Deadline
from chatgate_server.domain import ChatMessage, CompletionRequest, Feature
from chatgate_server.errors import (
    BreakerOpen,
    ChatgateError,
    DeadlineExceeded,
    InvalidRequest,
    TooManyStreams,
    UpstreamCredentialsError,
    UpstreamError,
    UpstreamRejected,
)
from chatgate_server.upstream.base import UpstreamStream
from chatgate_server.upstream.breaker import BreakerState, CircuitBreaker
from chatgate_server.upstream.deployment import Deployment
from chatgate_server.upstream.headroom import Headroom
from chatgate_server.upstream.retry import RetryPolicy, decide
from chatgate_server.upstream.router import Route, Router, breaker_failure


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
    # Both serve "fast" (the "*" entry too); the one that maps it is tried first.
    router = Router([passthrough, mapped], routes)

    def judged(model: str) -> BaseException:
        missing = UpstreamMisconfigured("misconfigured", problem="DeploymentNotFound", names_deployment=True)
        return router.plan(model).next().judge(missing)

    mistake = judged("gpt-4o-typo")  # the caller's name reached Azure as a deployment name
    assert isinstance(mistake, UpstreamRejected) and mistake.cause == "MODEL_NOT_FOUND"
    assert isinstance(judged("fast"), UpstreamMisconfigured)  # chatgate.toml chose "prod-mini"
    assert isinstance(judged("alias"), UpstreamMisconfigured)  # a route chose "gpt-4o"
    wrong_version = UpstreamMisconfigured("misconfigured", problem="api-version")
    assert router.plan("gpt-4o-typo").next().judge(wrong_version) is wrong_version  # never the caller's


def test_a_deployment_that_names_the_model_is_tried_before_a_pass_through() -> None:
    for draw in (0.0, 0.5, 0.99):  # whatever the weighted draw
        clock = Clock()
        passthrough = deployment("azure-any", clock)  # models: "*"
        mapped = deployment("azure-mapped", clock, models={"fast": "prod-mini"})
        plan = Router([passthrough, mapped], rng=lambda d=draw: d).plan("fast")  # type: ignore[misc]
        first = plan.next()
        assert first.deployment is mapped and first.request(request("fast")).model == "prod-mini"
        plan.failed(UpstreamError("503"))
        assert plan.next().deployment is passthrough  # still the next one to try


def test_a_router_without_deployments_is_refused_at_construction() -> None:
    with pytest.raises(ValueError) as refused:
        Router([])
    assert str(refused.value) == "a router needs at least one deployment"


def test_an_unserved_model_names_the_model_field() -> None:
    a = deployment("a", Clock(), models={"gpt-4o": "gpt-4o"})
    with pytest.raises(InvalidRequest) as refused:
        Router([a]).plan("gpt-5")
    assert [(v.field, v.description) for v in refused.value.violations] == [
        ("model", "no deployment of this service serves this model")
    ]


def test_options_accepted_only_apart_name_each_field() -> None:
    clock = Clock()
    reasoning = deployment("reasoning", clock, accepts=frozenset({"reasoning_effort"}))
    logprobs = deployment("logprobs", clock, accepts=frozenset({"logprobs"}))
    router = Router([reasoning, logprobs], {"both": Route("both", "gpt-4o", (reasoning, logprobs))})
    with pytest.raises(InvalidRequest) as refused:
        router.plan("both", frozenset({"logprobs", "reasoning_effort"}))
    assert sorted(v.field for v in refused.value.violations) == ["logprobs", "reasoning_effort"]


def test_fallbacks_that_name_each_other_plan_each_deployment_once() -> None:
    clock = Clock()
    a, b = deployment("a", clock), deployment("b", clock)
    routes = {
        "one": Route("one", "gpt-4o", (a,), fallback="two"),
        "two": Route("two", "gpt-4o-mini", (b,), fallback="one"),
    }
    plan = Router([a, b], routes).plan("one")
    # A route reached as a fallback says so: the final event and the row name it.
    assert [(c.deployment.name, c.model, c.fallback) for c in plan.candidates] == [
        ("a", "gpt-4o", None),
        ("b", "gpt-4o-mini", "two"),
    ]


def headroom_left(d: Deployment, remaining: int) -> None:
    d.headroom.observe(
        [
            (b"x-ratelimit-limit-requests", b"100"),
            (b"x-ratelimit-remaining-requests", str(remaining).encode()),
        ],
        200,
    )


def test_deployments_low_on_headroom_go_last_the_most_headroom_first() -> None:
    clock = Clock()
    dry, low, edge, full = (
        deployment(n, clock, headroom=Headroom(clock)) for n in ("dry", "low", "edge", "full")
    )
    headroom_left(dry, 1)  # 1 %
    headroom_left(low, 4)  # 4 %
    headroom_left(edge, 5)  # exactly the 5 % line: low
    router = Router([dry, low, edge, full], {"m": Route("m", "gpt-4o", (dry, low, edge, full))})
    assert [c.deployment.name for c in router.plan("m").candidates] == ["full", "edge", "low", "dry"]


def test_a_weighted_draw_shares_first_place_by_weight_times_headroom() -> None:
    clock = Clock()
    a, b = deployment("a", clock, headroom=Headroom(clock)), deployment("b", clock, headroom=Headroom(clock))
    headroom_left(a, 25)
    points = iter(i / 100 for i in range(100))
    router = Router([a, b], {"m": Route("m", "gpt-4o", (a, b), weighted=True)}, rng=lambda: next(points))
    first = [router.plan("m").candidates[0].deployment.name for _ in range(100)]
    assert first.count("a") == 20  # 0.25 / (0.25 + 1)


def test_every_stream_limit_reached_says_so() -> None:
    clock = Clock()
    a = deployment("a", clock, max_concurrent_streams=1)
    router = Router([a])
    router.plan("gpt-4o").next()
    with pytest.raises(TooManyStreams) as refused:
        router.plan("gpt-4o").next()
    assert refused.value.message == "every deployment serving this model is at its stream limit"


def test_every_breaker_open_says_calls_are_paused() -> None:
    clock = Clock()
    a = deployment("a", clock)
    open_breaker(a)
    with pytest.raises(BreakerOpen) as refused:
        Router([a]).plan("gpt-4o").next()
    assert refused.value.message == "every deployment serving this model is failing; calls are paused"


def test_no_failover_to_a_deployment_that_is_full_or_whose_breaker_is_open() -> None:
    clock = Clock()
    a, b = deployment("a", clock), deployment("b", clock, max_concurrent_streams=1)
    router = Router([a, b], {"m": Route("m", "gpt-4o", (a, b))})
    Router([b]).plan("gpt-4o").next()  # another call holds b's one stream
    plan = router.plan("m")
    plan.next()
    plan.failed(UpstreamError("503"))
    assert not plan.would_move()  # b is full: the retry stays on a, after a backoff
    b.in_flight = 0
    open_breaker(b)
    assert not plan.would_move()  # b's breaker is open


def test_a_failover_skips_an_open_breaker_to_the_next_deployment() -> None:
    clock = Clock()
    a, b, c = deployment("a", clock), deployment("b", clock), deployment("c", clock)
    plan = Router([a, b, c], {"m": Route("m", "gpt-4o", (a, b, c))}).plan("m")
    plan.next()
    plan.failed(UpstreamError("503"))
    open_breaker(b)
    assert plan.would_move() and plan.next().deployment is c


def test_nothing_to_move_to_when_every_breaker_refused_the_first_attempt() -> None:
    clock = Clock()
    a, b = deployment("a", clock), deployment("b", clock)
    plan = Router([a, b], {"m": Route("m", "gpt-4o", (a, b))}).plan("m")
    open_breaker(a)
    open_breaker(b)
    with pytest.raises(BreakerOpen):
        plan.next()
    assert not plan.would_move()


def test_a_misconfigured_deployment_is_reported_to_the_operator_once() -> None:
    from chatgate_server.errors import UpstreamMisconfigured

    clock = Clock()
    a = deployment("a", clock)
    plan = Router([a]).plan("gpt-4o")
    plan.next()
    plan.failed(UpstreamMisconfigured("misconfigured", problem="api-version"))
    assert a.misconfigurations == {"api-version"}


def test_a_successful_probe_closes_the_breaker() -> None:
    clock = Clock()
    a = deployment("a", clock)
    open_breaker(a)
    clock.now += 10
    assert a.breaker.state.name == "HALF_OPEN"  # the next call is the probe
    plan = Router([a]).plan("gpt-4o")
    plan.next()
    plan.succeeded()
    assert a.breaker.state is BreakerState.CLOSED


def test_a_call_that_failed_without_the_deployments_fault_does_not_count_against_it() -> None:
    clock = Clock()
    a = deployment("a", clock)
    plan = Router([a]).plan("gpt-4o")
    plan.next()
    plan.judged(failure=False)
    assert a.breaker.state is BreakerState.CLOSED and a.breaker.in_flight == 0 and a.in_flight == 0


def test_a_missing_deployment_judged_the_callers_keeps_the_upstream_status() -> None:
    from chatgate_server.errors import UpstreamMisconfigured

    plan = Router([deployment("azure-any", Clock())]).plan("gpt-4o-typo")
    missing = UpstreamMisconfigured("x", problem="DeploymentNotFound", http_status=400, names_deployment=True)
    judged = plan.next().judge(missing)
    assert isinstance(judged, UpstreamRejected) and judged.http_status == 400


@pytest.mark.parametrize(
    ("error", "started", "first_token", "counts"),
    [
        (UpstreamError("503"), False, False, True),  # the upstream failed before any content
        (UpstreamError("503"), True, False, True),  # started, but no token yet
        (UpstreamError("503"), True, True, False),  # failed after content: the stream was served
        (UpstreamRejected("bad request"), False, False, False),  # the caller's mistake
        (DeadlineExceeded("deadline"), False, False, True),  # the upstream never answered
        (DeadlineExceeded("deadline"), True, False, False),  # it answered; the caller's deadline ran out
        (InvalidRequest([]), False, False, False),  # neither
    ],
)
def test_which_failed_calls_count_against_the_deployment(
    error: ChatgateError, started: bool, first_token: bool, counts: bool
) -> None:
    assert breaker_failure(error, started, first_token) is counts


def test_a_fallback_to_a_model_no_route_names_is_chatgate_tomls_choice() -> None:
    from chatgate_server.errors import UpstreamMisconfigured

    clock = Clock()
    azure = deployment("azure-any", clock)  # models: "*"
    routes = {"fast": Route("fast", "gpt-4o", (azure,), fallback="gpt-4o-mini")}
    plan = Router([azure], routes).plan("fast")
    plan.next()
    plan.failed(UpstreamError("503"))
    leg = plan.next()
    assert (leg.candidate.model, leg.candidate.fallback) == ("gpt-4o-mini", "gpt-4o-mini")
    missing = UpstreamMisconfigured("misconfigured", problem="DeploymentNotFound", names_deployment=True)
    assert leg.judge(missing) is missing  # the operator's problem, not the caller's


def test_the_highest_draw_random_can_make_still_picks_a_deployment() -> None:
    # 0.1 + 0.1 + 2/3 drawn at random()'s largest value: subtracting the weights in turn
    # leaves exactly 0.0, never below it; the last deployment takes the place.
    clock = Clock()
    ds = [deployment(n, clock, weight=w) for n, w in (("a", 0.1), ("b", 0.1), ("c", 2 / 3))]
    router = Router(ds, {"m": Route("m", "gpt-4o", tuple(ds), weighted=True)}, rng=lambda: 1 - 2**-53)
    assert [c.deployment.name for c in router.plan("m").candidates] == ["c", "b", "a"]


def test_every_call_on_a_deployment_counts_toward_its_stream_limit() -> None:
    clock = Clock()
    a, b = deployment("a", clock, max_concurrent_streams=2), deployment("b", clock)
    router = Router([a, b], {"m": Route("m", "gpt-4o", (a, b))})
    assert [router.plan("m").next().deployment.name for _ in range(3)] == ["a", "a", "b"]
    assert a.in_flight == 2


def test_a_plan_released_again_after_its_end_changes_nothing() -> None:
    clock = Clock()
    a = deployment("a", clock)
    plan = Router([a]).plan("gpt-4o")
    plan.next()
    plan.succeeded()
    plan.release()
    assert a.in_flight == 0 and a.breaker.in_flight == 0 and a.breaker.state is BreakerState.CLOSED
