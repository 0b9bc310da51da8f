"""Deployment specs (``deployments.py``) → adapters, breakers and the router.

Each deployment gets an adapter of its kind with a connection pool and a breaker of
its own; the settings give what is common (timeouts, pool size, breaker rule).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from chatgate_server.config import Settings
from chatgate_server.deployments import DeploymentsConfig, DeploymentSpec
from chatgate_server.upstream.azure import AzureOpenAIUpstream
from chatgate_server.upstream.breaker import CircuitBreaker
from chatgate_server.upstream.deployment import Deployment
from chatgate_server.upstream.openai import OpenAIUpstream
from chatgate_server.upstream.router import Route, Router


def build_router(
    config: DeploymentsConfig,
    settings: Settings,
    keep: Sequence[tuple[DeploymentSpec, Deployment]] = (),
) -> Router:
    """The router over every deployment of ``config``. A deployment whose spec is in
    ``keep`` unchanged (a reload) is reused as it is: its pool, breaker and headroom
    carry on. Close the adapters with :func:`close_deployments` once no call uses them."""
    deployments = {
        spec.name: next((d for old, d in keep if old == spec), None) or _deployment(spec, settings)
        for spec in config.deployments
    }
    routes = {
        route.name: Route(
            name=route.name,
            model=route.model,
            deployments=tuple(deployments[name] for name in route.deployments),
            weighted=route.weighted,
            fallback=route.fallback,
        )
        for route in config.routes
    }
    return Router(list(deployments.values()), routes)


async def close_deployments(deployments: Iterable[Deployment]) -> None:
    for deployment in deployments:
        await deployment.upstream.aclose()


def _deployment(spec: DeploymentSpec, s: Settings) -> Deployment:
    upstream = _adapter(spec, s)
    return Deployment(
        name=spec.name,
        upstream=upstream,
        headroom=upstream.headroom,
        breaker=CircuitBreaker(
            spec.name,
            failure_threshold=s.breaker_failure_threshold,
            window_s=s.breaker_window_s,
            failure_rate=s.breaker_failure_rate,
            cooldown_s=s.breaker_cooldown_s,
            max_cooldown_s=s.breaker_max_cooldown_s,
        ),
        models=dict(spec.models),
        weight=spec.weight,
        max_concurrent_streams=spec.max_concurrent_streams,
        accepts=spec.accepts,
    )


def _adapter(spec: DeploymentSpec, s: Settings) -> OpenAIUpstream:
    max_connections = spec.max_connections or s.upstream_max_connections
    if spec.kind == "azure":
        assert spec.api_key is not None and spec.api_version is not None  # checked on load
        return AzureOpenAIUpstream(
            spec.base_url,
            spec.api_key,
            api_version=spec.api_version,
            connect_timeout=s.upstream_connect_timeout_s,
            max_connections=max_connections,
            coalesce_deltas=s.coalesce_deltas,
            extra_headers=spec.headers,
        )
    return OpenAIUpstream(
        spec.base_url,
        spec.api_key,
        connect_timeout=s.upstream_connect_timeout_s,
        max_connections=max_connections,
        coalesce_deltas=s.coalesce_deltas,
        extra_headers=spec.headers,
    )
