"""The routing micro-benchmark measures what it says: every case routes its calls, the
failover case really moves each call, and nothing is left held afterwards."""

from __future__ import annotations

from bench import routing


def test_each_case_routes_every_call_and_leaves_nothing_held() -> None:
    for case in routing._cases():
        assert routing._run(case, 50) > 0
        for deployment in case.router.deployments:
            assert deployment.in_flight == 0 and deployment.breaker.in_flight == 0, case.name


def test_the_failover_case_takes_two_attempts_on_two_deployments() -> None:
    [case] = [c for c in routing._cases() if c.attempts == 2]
    plan = case.router.plan("m")
    first = plan.next().deployment
    plan.failed(Exception("500"))
    assert plan.next().deployment is not first
    plan.succeeded()
