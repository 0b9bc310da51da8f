"""Which upstream deployments chatgate sends calls to, and how model names route to them.

Without a config file there is one deployment, ``openai``, made from the environment
(``OPENAI_BASE_URL``, ``OPENAI_API_KEY``) and serving every model: the zero-config
default. With ``CHATGATE_CONFIG`` naming a TOML file (``chatgate.toml``), its
``[[deployments]]`` and ``[[routes]]`` (or ``[routes.NAME]``) replace it; the README
has a worked example. Keys are never in the file: each deployment names an
environment variable (``key_env``) or a file (``key_file``) to read it from.

Every problem is one line naming the file, the key and what is wrong
(``chatgate.toml: deployments[1] (azure-east).api_version: required ...``); the key's
value is never part of it.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from chatgate_server.config import DEFAULT_OPENAI_BASE_URL, ConfigError, Secret, Settings
from chatgate_server.domain import FEATURES, Feature

if TYPE_CHECKING:
    from chatgate_server.usage.pricing import PriceTable

Kind = Literal["openai", "azure", "compatible"]
KINDS: tuple[Kind, ...] = ("openai", "azure", "compatible")

# The name of the one deployment made from the environment.
ENV_DEPLOYMENT = "openai"

# The request options a deployment of each kind accepts unless its ``accepts`` says
# otherwise. OpenAI: all. Azure: all but service_tier (its priority processing is a
# preview enabled per deployment, and it has no flex tier: list service_tier in
# ``accepts`` for a deployment that has it). A compatible server: none, since vLLM,
# Ollama and kin each take a different subset; list what yours honours.
DEFAULT_ACCEPTS: Mapping[Kind, frozenset[Feature]] = {
    "openai": frozenset(FEATURES),
    "azure": frozenset(FEATURES) - {"service_tier"},
    "compatible": frozenset(),
}


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
    prices_file: Path | None = None
    """Prices for calls this deployment serves (CHATGATE_PRICES_FILE's format), over the
    shipped table and CHATGATE_PRICES_FILE: e.g. Azure's prices, or 0 for a self-hosted model."""
    accepts: frozenset[Feature] = frozenset(FEATURES)
    """The request options (domain.FEATURES) this deployment is sent; a call setting
    another one goes elsewhere (``accepts`` in the file; DEFAULT_ACCEPTS by kind)."""


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
    """The config file's deployments, or the zero-config default: one OpenAI deployment
    from the environment."""
    if settings.config_file is not None:
        return load_config(settings.config_file)
    if not settings.openai_api_key.value:
        raise ConfigError("OPENAI_API_KEY is not set (or set OPENAI_API_KEY_FILE, or CHATGATE_CONFIG)")
    spec = DeploymentSpec(
        name=ENV_DEPLOYMENT, kind="openai", base_url=settings.openai_base_url, api_key=settings.openai_api_key
    )
    return DeploymentsConfig((spec,))


# --- the config file ------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_AZURE_VERSION = re.compile(r"v1|\d{4}-\d{2}-\d{2}(-preview)?")
_DEPLOYMENT_KEYS = frozenset(
    {
        "name",
        "kind",
        "base_url",
        "resource",
        "api_version",
        "key_env",
        "key_file",
        "models",
        "weight",
        "max_concurrent_streams",
        "max_connections",
        "headers",
        "prices_file",
        "accepts",
    }
)
_ROUTE_KEYS = frozenset({"name", "model", "deployments", "strategy", "fallback"})
_INLINE_KEYS = frozenset({"key", "api_key", "apikey", "api-key", "secret", "token", "password"})
# Headers chatgate sets itself, or that carry credentials (which go by reference only).
_RESERVED_HEADERS = frozenset(
    {
        "authorization",
        "api-key",
        "proxy-authorization",
        "cookie",
        "host",
        "content-length",
        "content-type",
        "accept",
        "transfer-encoding",
        "connection",
        "x-client-request-id",
    }
)


class _Problem(Exception):
    """A problem at one key; becomes the one-line ConfigError naming file and key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{_shown(key, 200)}: {_shown(problem, 400)}")


def _shown(text: str, limit: int) -> str:
    """``text`` as one printable line of at most about ``limit`` characters: a quoted
    TOML key or a header name may hold newlines and control characters, or run to
    kilobytes, and the error must stay one line a terminal or log shows as it is."""
    if not text:
        return '""'
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def load_config(path: Path, env: Mapping[str, str] | None = None, *, keys: bool = True) -> DeploymentsConfig:
    """Read and check ``path``; ConfigError with one line naming the file, key and problem.

    Keys are read from the environment variables and files the deployments name (with
    ``keys=False`` they are not: for commands that only need names and prices)."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except ValueError:  # a NUL in the name (after its subclasses above)
        raise ConfigError(f"{_shown(str(path), 400)}: cannot be read: not a file name") from None
    try:
        return _config(raw, str(path), os.environ if env is None else env, keys)
    except _Problem as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _config(raw: dict[str, Any], source: str, env: Mapping[str, str], keys: bool) -> DeploymentsConfig:
    unknown = set(raw) - {"deployments", "routes"}
    if unknown:
        raise _Problem(sorted(unknown)[0], "unknown key (expected [[deployments]] and [[routes]])")
    items = raw.get("deployments")
    if not isinstance(items, list) or not items:
        raise _Problem("deployments", "at least one [[deployments]] table is required")
    deployments: list[DeploymentSpec] = []
    for index, item in enumerate(items):
        spec = _deployment(item, f"deployments[{index}]", env, keys)
        if any(d.name == spec.name for d in deployments):
            raise _Problem(f"deployments[{index}].name", f"{spec.name!r} is used twice")
        deployments.append(spec)
    routes = _routes(raw.get("routes", []), deployments)
    return DeploymentsConfig(tuple(deployments), routes, source)


def _deployment(item: Any, at: str, env: Mapping[str, str], keys: bool) -> DeploymentSpec:
    if not isinstance(item, dict):
        raise _Problem(at, "must be a table")
    inline = _INLINE_KEYS & {k.lower() for k in item}
    if inline:
        raise _Problem(
            f"{at}.{sorted(inline)[0]}", "keys are never written in the file: use key_env or key_file"
        )
    unknown = set(item) - _DEPLOYMENT_KEYS
    if unknown:
        raise _Problem(f"{at}.{sorted(unknown)[0]}", "unknown key")
    name = _string(item, "name", at)
    if not _NAME.fullmatch(name):
        raise _Problem(f"{at}.name", "1-64 characters of A-Z a-z 0-9 . _ - (starting with a letter or digit)")
    at = f"{at} ({name})"
    kind = _string(item, "kind", at)
    if kind not in KINDS:
        raise _Problem(f"{at}.kind", f"must be one of {', '.join(KINDS)}")
    return DeploymentSpec(
        name=name,
        kind=kind,  # checked just above
        base_url=_url(item, kind, at),
        api_key=_key(item, kind, at, env) if keys else None,
        api_version=_api_version(item, kind, at),
        models=_models(item.get("models", ["*"]), f"{at}.models"),
        weight=_number(item, "weight", at, 1.0),
        max_concurrent_streams=_count(item, "max_concurrent_streams", at),
        max_connections=_count(item, "max_connections", at),
        headers=_headers(item.get("headers", {}), f"{at}.headers"),
        prices_file=_prices_file(item, at),
        accepts=_accepts(item, kind, at),
    )


def _string(item: dict[str, Any], key: str, at: str, *, required: bool = True) -> str:
    value = item.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise _Problem(
            f"{at}.{key}", "required, a non-empty string" if value is None else "must be a non-empty string"
        )
    return value.strip()


def _url(item: dict[str, Any], kind: str, at: str) -> str:
    key = "resource" if kind == "azure" and "resource" in item else "base_url"
    if kind == "openai" and key not in item:
        return DEFAULT_OPENAI_BASE_URL
    if kind == "azure" and "resource" not in item and "base_url" not in item:
        raise _Problem(f"{at}.resource", "required for kind azure (e.g. https://NAME.openai.azure.com)")
    raw = _string(item, key, at)
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises for a port out of range or not a number
    except ValueError:  # an unclosed [IPv6 host, a port out of range
        raise _Problem(f"{at}.{key}", "must be an http(s) URL (with a valid host and port)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Problem(f"{at}.{key}", "must be an http(s) URL")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise _Problem(f"{at}.{key}", "must not carry credentials, a query or a fragment")
    return raw.rstrip("/")


def _key(item: dict[str, Any], kind: str, at: str, env: Mapping[str, str]) -> Secret | None:
    key_env = _string(item, "key_env", at, required=False)
    key_file = _string(item, "key_file", at, required=False)
    if key_env and key_file:
        raise _Problem(f"{at}.key_file", "set key_env or key_file, not both")
    if not key_env and not key_file:
        if kind == "compatible":
            return None  # a server that takes no key
        raise _Problem(f"{at}.key_env", f"required for kind {kind} (or key_file)")
    if key_env and not _ENV_NAME.fullmatch(key_env):
        # Never echoed: the likeliest value here that is no variable's name is the key itself.
        raise _Problem(f"{at}.key_env", "must be the name of an environment variable (A-Z a-z 0-9 _)")
    if key_env:
        value = env.get(key_env, "").strip()
        if not value:
            raise _Problem(f"{at}.key_env", f"the environment variable {key_env} is not set")
        where = f"{at}.key_env"
    else:
        try:
            value = Path(key_file).read_text(encoding="utf-8").strip()
        except (OSError, ValueError) as exc:  # ValueError: not UTF-8, or a NUL in the name
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text, or not a file name"
            # The path is not echoed: the likeliest key_file that cannot be read is the key
            # itself, written where its file's name belongs.
            raise _Problem(f"{at}.key_file", f"the file cannot be read: {reason}") from None
        if not value:
            raise _Problem(f"{at}.key_file", "the file is empty")
        where = f"{at}.key_file"
    if not (value.isascii() and value.isprintable()) or any(c.isspace() for c in value):
        # It goes into a header verbatim. Never echo it: a malformed key is still a secret.
        raise _Problem(where, "the key must be printable ASCII with no whitespace")
    return Secret(value)


def _prices_file(item: dict[str, Any], at: str) -> Path | None:
    from chatgate_server.usage.pricing import PriceFileError, read_operator_file

    raw = _string(item, "prices_file", at, required=False)
    if not raw:
        return None
    try:
        read_operator_file(Path(raw))
    except PriceFileError as exc:
        raise _Problem(f"{at}.prices_file", str(exc)) from None
    return Path(raw)


def deployment_prices(config: DeploymentsConfig, operator_file: Path | None) -> dict[str, PriceTable]:
    """The price table of each deployment that has its own prices (by name)."""
    from chatgate_server.usage.pricing import load_prices

    return {d.name: load_prices(operator_file, d.prices_file) for d in config.deployments if d.prices_file}


def _accepts(item: dict[str, Any], kind: Kind, at: str) -> frozenset[Feature]:
    value = item.get("accepts")
    if value is None:
        return DEFAULT_ACCEPTS[kind]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Problem(f"{at}.accepts", f"a list of request options: {', '.join(FEATURES)}")
    unknown = [v for v in value if v not in FEATURES]
    if unknown:
        raise _Problem(f"{at}.accepts", f"{unknown[0]!r} is not one of {', '.join(FEATURES)}")
    return frozenset(v for v in FEATURES if v in value)


def _api_version(item: dict[str, Any], kind: str, at: str) -> str | None:
    if kind != "azure":
        if "api_version" in item:
            raise _Problem(f"{at}.api_version", "only for kind azure")
        return None
    version = _string(item, "api_version", at)
    if not _AZURE_VERSION.fullmatch(version):
        raise _Problem(
            f"{at}.api_version", "a dated version such as 2024-10-21, or v1 for the /openai/v1/ form"
        )
    return version


def _models(value: Any, at: str) -> dict[str, str]:
    if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
        return {v.strip(): v.strip() for v in value}
    if (
        isinstance(value, dict)
        and value
        and all(
            isinstance(k, str) and k.strip() and isinstance(v, str) and v.strip() for k, v in value.items()
        )
    ):
        return {k.strip(): v.strip() for k, v in value.items()}
    raise _Problem(
        at, 'a list of model names (["gpt-4o"], "*" for any) or a table of model = "upstream name"'
    )


def _number(item: dict[str, Any], key: str, at: str, default: float) -> float:
    value = item.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        # inf would win every weighted draw (and inf - inf is NaN in the draw itself).
        raise _Problem(f"{at}.{key}", "must be a number above 0 (not inf)")
    return float(value)


def _count(item: dict[str, Any], key: str, at: str) -> int | None:
    value = item.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Problem(f"{at}.{key}", "must be a whole number of at least 1")
    return value


def _headers(value: Any, at: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise _Problem(at, 'a table of "Header-Name" = "value"')
    out = []
    for name, text in value.items():
        if not isinstance(text, str) or not text.isprintable() or not _HEADER_NAME.fullmatch(name):
            raise _Problem(f"{at}.{name}", "a header name and a printable string value")
        if name.lower() in _RESERVED_HEADERS:
            raise _Problem(
                f"{at}.{name}", "chatgate sets this header itself (credentials go by key_env or key_file)"
            )
        out.append((name, text))
    return tuple(out)


_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")


def _routes(value: Any, deployments: list[DeploymentSpec]) -> tuple[RouteSpec, ...]:
    """``[[routes]]`` with a name each, or ``[routes.NAME]`` tables."""
    if isinstance(value, dict):
        items = [
            (f"routes.{name}", {"name": name, **body}) if isinstance(body, dict) else (f"routes.{name}", body)
            for name, body in value.items()
        ]
    elif isinstance(value, list):
        items = [(f"routes[{i}]", body) for i, body in enumerate(value)]
    else:
        raise _Problem("routes", "[[routes]] tables or [routes.NAME] tables")
    by_name = {d.name: d for d in deployments}
    routes: list[RouteSpec] = []
    for at, item in items:
        route = _route(item, at, by_name)
        if any(r.name == route.name for r in routes):
            raise _Problem(f"{at}.name", f"{route.name!r} is routed twice")
        routes.append(route)
    names = {r.name for r in routes}
    for at, route in zip((a for a, _ in items), routes, strict=True):
        fallback = route.fallback
        if fallback is not None and fallback not in names and not _served(fallback, deployments):
            raise _Problem(f"{at}.fallback", f"no route or deployment serves {fallback!r}")
    return tuple(routes)


def _route(item: Any, at: str, by_name: Mapping[str, DeploymentSpec]) -> RouteSpec:
    if not isinstance(item, dict):
        raise _Problem(at, "must be a table")
    unknown = set(item) - _ROUTE_KEYS
    if unknown:
        raise _Problem(f"{at}.{sorted(unknown)[0]}", "unknown key")
    name = _string(item, "name", at)
    model = _string(item, "model", at, required=False) or name
    listed = item.get("deployments")
    if not isinstance(listed, list) or not listed or not all(isinstance(n, str) for n in listed):
        raise _Problem(f"{at}.deployments", "a non-empty list of deployment names")
    for deployment in listed:
        spec = by_name.get(deployment)
        if spec is None:
            raise _Problem(f"{at}.deployments", f"no deployment is named {deployment!r}")
        if not _served(model, [spec]):
            raise _Problem(
                f"{at}.deployments", f"deployment {deployment!r} does not serve {model!r} (its models)"
            )
    if len(set(listed)) != len(listed):
        raise _Problem(f"{at}.deployments", "a deployment is listed twice")
    strategy = _string(item, "strategy", at, required=False) or "ordered"
    if strategy not in ("ordered", "weighted"):
        raise _Problem(f"{at}.strategy", "ordered or weighted")
    fallback = _string(item, "fallback", at, required=False) or None
    if fallback == name:
        raise _Problem(f"{at}.fallback", "a route cannot fall back to itself")
    return RouteSpec(name, model, tuple(listed), weighted=strategy == "weighted", fallback=fallback)


def _served(model: str, deployments: list[DeploymentSpec]) -> bool:
    return any(model in d.models or "*" in d.models for d in deployments)
