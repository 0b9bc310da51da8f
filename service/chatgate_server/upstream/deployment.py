"""One deployment: an upstream endpoint with its own adapter, pool, breaker and models.

A deployment is what the router chooses between. Its adapter (``openai.py``,
``azure.py``) holds the credentials and the connection pool, so a key is only ever
sent to the endpoint it was configured for; its breaker counts that endpoint's
failures alone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from chatgate_server.domain import FEATURES, CompletionRequest, Feature
from chatgate_server.errors import UpstreamMisconfigured
from chatgate_server.upstream.base import Upstream
from chatgate_server.upstream.breaker import CircuitBreaker
from chatgate_server.upstream.headroom import Headroom

log = logging.getLogger(__name__)

# In a deployment's model map: serve any model under the name the caller used.
ANY_MODEL = "*"


@dataclass(eq=False, slots=True)
class Deployment:
    """An upstream endpoint the router may send an attempt to."""

    name: str
    """Stable name for rows, spans, metrics, logs and the breaker (e.g. "azure-east")."""
    upstream: Upstream
    breaker: CircuitBreaker
    models: Mapping[str, str] = field(default_factory=lambda: {ANY_MODEL: ANY_MODEL})
    """Model name as routed → the name this upstream knows it by (an Azure deployment
    name, a self-hosted model's name); ``"*"`` serves any model under its own name."""
    weight: float = 1.0
    """Share of traffic among the deployments of a weighted route."""
    max_concurrent_streams: int | None = None
    """Attempts this deployment may run at once; beyond it the router looks elsewhere."""
    in_flight: int = 0
    """Attempts running here now (counted by the router)."""
    headroom: Headroom = field(default_factory=Headroom)
    """Rate limit left, as the adapter read it from the upstream's responses."""
    accepts: frozenset[Feature] = frozenset(FEATURES)
    """The request options it may be sent (chatgate.toml ``accepts``): the router passes
    it over for a call that sets any other."""
    misconfigurations: set[str] = field(default_factory=set)
    """Configuration problems the upstream named (each logged once)."""

    def misconfigured(self, error: UpstreamMisconfigured) -> None:
        """Tell the operator, once per problem, that this deployment is configured wrong
        (a reload that changes it makes a new deployment, which says so again if it still is)."""
        if error.problem in self.misconfigurations:
            return
        self.misconfigurations.add(error.problem)
        log.warning(
            "deployment %s is misconfigured: %s; its calls go to the route's other deployments"
            " and count toward its breaker until it is fixed (chatgate.toml, or the resource)",
            self.name,
            error.problem,
            extra={"fields": {"deployment": self.name, "upstream_status": error.http_status}},
        )

    def serves(self, model: str) -> bool:
        return model in self.models or ANY_MODEL in self.models

    def upstream_model(self, model: str) -> str:
        """The name to send for ``model`` (the caller's name unless mapped)."""
        mapped = self.models.get(model)
        return model if mapped is None or mapped == ANY_MODEL else mapped

    def request_for(self, request: CompletionRequest, model: str) -> CompletionRequest:
        """``request`` as this deployment is asked it: its own name for the model."""
        name = self.upstream_model(model)
        return request if name == request.model else replace(request, model=name)

    @property
    def room(self) -> float:
        """Headroom from 0 to 1, the attempts running here taken off what is left."""
        return self.headroom.fraction(self.in_flight)

    @property
    def full(self) -> bool:
        limit = self.max_concurrent_streams
        return limit is not None and self.in_flight >= limit
