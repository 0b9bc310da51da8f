"""Which upstream deployments chatgate sends calls to, and how model names route to them.

Without a config file there is one deployment, ``openai``, made from the environment
(``OPENAI_BASE_URL``, ``OPENAI_API_KEY``) and serving every model: the zero-config
default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from chatgate_server.config import ConfigError, Secret, Settings

Kind = Literal["openai", "azure", "compatible"]
KINDS: tuple[Kind, ...] = ("openai", "azure", "compatible")

# The name of the one deployment made from the environment.
ENV_DEPLOYMENT = "openai"


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    """One deployment as configured (checked; the key resolved from its reference)."""

    name: str
    kind: Kind
    base_url: str
    """The API root (OpenAI, compatible: including ``/v1``) or the Azure resource URL."""
    api_key: Secret | None
    """None only for a ``compatible`` server that takes no key."""
    api_version: str | None = None
    """Azure: a dated API version, or ``v1`` for the ``/openai/v1/`` form."""
    models: Mapping[str, str] = field(default_factory=lambda: {"*": "*"})
    """Model → the name this deployment knows it by; ``"*"``: any model, same name."""
    weight: float = 1.0
    max_concurrent_streams: int | None = None
    max_connections: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
    """Static headers sent with every request (never credentials: those go by reference)."""


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """A model name or alias callers use → deployments, in order or by weight."""

    name: str
    model: str
    deployments: tuple[str, ...]
    weighted: bool = False
    fallback: str | None = None


@dataclass(frozen=True, slots=True)
class DeploymentsConfig:
    deployments: tuple[DeploymentSpec, ...]
    routes: tuple[RouteSpec, ...] = ()
    source: str = "environment"
    """Where it came from: the config file's path, or "environment"."""

    @property
    def secret_material(self) -> str:
        """Every key, joined: what replicas sharing this config share (signs page tokens)."""
        return "\n".join(spec.api_key.value for spec in self.deployments if spec.api_key is not None)


def from_settings(settings: Settings) -> DeploymentsConfig:
    """The zero-config default: one OpenAI deployment from the environment."""
    if settings.openai_api_key is None:
        raise ConfigError("OPENAI_API_KEY is not set (or set OPENAI_API_KEY_FILE, or CHATGATE_CONFIG)")
    spec = DeploymentSpec(
        name=ENV_DEPLOYMENT, kind="openai", base_url=settings.openai_base_url, api_key=settings.openai_api_key
    )
    return DeploymentsConfig((spec,))
