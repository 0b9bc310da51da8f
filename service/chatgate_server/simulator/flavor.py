"""The two faces of the simulator: api.openai.com and an Azure OpenAI resource.

A flavor owns what differs between them on the wire for one chat request: how the
credential is read, the bodies of the errors each words its own way, the chunk style,
and the response headers (request ids, rate-limit headroom). Routing (which URLs each
serves) stays in ``app``; Azure's facts live in ``azure``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from . import azure
from .errors import ErrorResponse, budget_refusal, invalid_api_key, missing_key, model_not_found
from .errors import scenario_error as openai_scenario_error
from .keys import KeyRing, KeySeen, bearer_token
from .models import context_window
from .ratelimit import Headroom, Refusal, openai_headers
from .scenario import Scenario
from .stream import AZURE_STYLE, OPENAI_STYLE, ChunkStyle

FlavorName = Literal["openai", "azure"]
FLAVORS: tuple[FlavorName, ...] = ("openai", "azure")


class Flavor(Protocol):
    """What a flavor decides for one chat request."""

    @property
    def name(self) -> FlavorName:
        """``"openai"`` or ``"azure"``."""
        ...

    @property
    def style(self) -> ChunkStyle:
        """How its stream chunks look."""
        ...

    def authenticate(
        self, headers: Mapping[str, str], ring: KeyRing, *, v1: bool = False
    ) -> tuple[KeySeen, ErrorResponse | None]:
        """The credential seen, and the 401 when it is missing or refused (``v1``: Azure's v1 route)."""
        ...

    def unknown_model(self, name: str) -> ErrorResponse:
        """The 404 for a model (OpenAI) or deployment (Azure) not served."""
        ...

    def scenario_error(
        self, scenario: Scenario, model: str, api_version: str, request_id: str
    ) -> ErrorResponse:
        """The error an error scenario asks for."""
        ...

    def budget_refusal(
        self, refusal: Refusal, model: str, api_version: str, window_s: float
    ) -> ErrorResponse:
        """The 429 when the rate-limit budget cannot pay for the request."""
        ...

    def headers(self, request_id: str, headroom: Headroom | None) -> list[tuple[str, str]]:
        """Headers on every chat response (headroom is None before authentication)."""
        ...


class OpenAIFlavor:
    """api.openai.com: ``Authorization: Bearer``, OpenAI's bodies, six rate-limit headers."""

    name: FlavorName = "openai"
    style = OPENAI_STYLE

    def authenticate(
        self, headers: Mapping[str, str], ring: KeyRing, *, v1: bool = False
    ) -> tuple[KeySeen, ErrorResponse | None]:
        token = bearer_token(headers)
        if token is None:
            return KeySeen(), missing_key()
        key = ring.seen("bearer", token)
        return key, None if ring.accepts(key) else invalid_api_key()

    def unknown_model(self, name: str) -> ErrorResponse:
        return model_not_found(name)

    def scenario_error(
        self, scenario: Scenario, model: str, api_version: str, request_id: str
    ) -> ErrorResponse:
        if scenario.content_filter:
            return azure.content_filter_refusal()
        return openai_scenario_error(scenario, model)

    def budget_refusal(
        self, refusal: Refusal, model: str, api_version: str, window_s: float
    ) -> ErrorResponse:
        return budget_refusal(refusal, model)

    def headers(self, request_id: str, headroom: Headroom | None) -> list[tuple[str, str]]:
        headers = [
            ("openai-version", "2020-10-01"),
            ("openai-processing-ms", "1"),
            ("x-request-id", request_id),
        ]
        if headroom is not None:
            headers += openai_headers(headroom)
        return headers


@dataclass(frozen=True, slots=True)
class AzureFlavor:
    """An Azure OpenAI resource: ``api-key``, deployments, api-versions, Azure's bodies.

    ``deployments`` maps deployment names to the models they serve; None serves every
    known model under its own name (any name at all with ``any_model``).
    """

    deployments: Mapping[str, str] | None = None
    api_versions: frozenset[str] = azure.API_VERSIONS
    any_model: bool = False
    name: FlavorName = "azure"
    style: ChunkStyle = AZURE_STYLE

    def model_for(self, deployment: str) -> str | None:
        """The model a deployment serves, or None when the resource has no such deployment."""
        if self.deployments is not None:
            return self.deployments.get(deployment)
        return deployment if context_window(deployment, any_model=self.any_model) is not None else None

    def authenticate(
        self, headers: Mapping[str, str], ring: KeyRing, *, v1: bool = False
    ) -> tuple[KeySeen, ErrorResponse | None]:
        return azure.authenticate(headers, ring, v1=v1)

    def unknown_model(self, name: str) -> ErrorResponse:
        return azure.deployment_not_found()

    def scenario_error(
        self, scenario: Scenario, model: str, api_version: str, request_id: str
    ) -> ErrorResponse:
        return azure.scenario_error(scenario, model, api_version, request_id)

    def budget_refusal(
        self, refusal: Refusal, model: str, api_version: str, window_s: float
    ) -> ErrorResponse:
        return azure.budget_refusal(refusal, api_version, window_s)

    def headers(self, request_id: str, headroom: Headroom | None) -> list[tuple[str, str]]:
        headers = [("x-request-id", request_id)]
        if headroom is not None:
            headers += azure.response_headers(headroom)
        return headers
