"""Azure OpenAI's side of the wire: URLs, ``api-version``, the ``api-key`` header, error
bodies and headers, as Azure sends them (wording as reported in peers' issue trackers and
Microsoft's API reference; the simulator never echoes a key).

Two URL forms reach a chat completion:

- classic: ``POST /openai/deployments/{deployment}/chat/completions?api-version=V``;
  the deployment in the path picks the model (a ``model`` in the body is ignored).
  Without ``api-version`` Azure answers 404 "Resource not found"; with one it does not
  serve, 400 "API version not supported".
- v1: ``POST /openai/v1/chat/completions``, the plain OpenAI body, whose ``model`` is
  the deployment name; no dated ``api-version`` (``v1``/``preview``/``latest`` or none);
  the key may come as ``Authorization: Bearer`` too, as the plain OpenAI client sends it.

Azure's error bodies come in three shapes: its own ``{"error": {"code", "message"}}``
(401, 404, 429, api-version), the model service's OpenAI-shaped body passed through
(400 validation, 500), and a bare ``{"statusCode", "message"}`` for a refused bearer
token. Chatgate's classifier has to cope with all three, so the simulator sends each.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from random import getrandbits
from urllib.parse import parse_qs, unquote

import orjson

from .errors import ErrorResponse, error_body, retry_headers
from .errors import scenario_error as openai_scenario_error
from .keys import KeyRing, KeySeen, api_key, bearer_token
from .ratelimit import Headroom, Refusal, azure_headers
from .scenario import Scenario
from .stream import PROMPT_RESULTS

# Chat-completions api-versions Azure serves (GA and the previews of the last two years).
# fmt: off
API_VERSIONS: frozenset[str] = frozenset({
    "2023-05-15", "2024-02-01", "2024-06-01", "2024-10-21",
    "2024-02-15-preview", "2024-03-01-preview", "2024-04-01-preview", "2024-05-01-preview",
    "2024-07-01-preview", "2024-08-01-preview", "2024-09-01-preview", "2024-10-01-preview",
    "2024-12-01-preview", "2025-01-01-preview", "2025-02-01-preview", "2025-03-01-preview",
    "2025-04-01-preview",
})
# fmt: on
V1_API_VERSIONS = frozenset({"v1", "preview", "latest"})

DEPLOYMENT_PREFIX = "/openai/deployments/"
CHAT_SUFFIX = "/chat/completions"
V1_CHAT_PATH = "/openai/v1/chat/completions"
REGION = "simulated"
DEFAULT_RETRY_AFTER_MS = 1000


@dataclass(frozen=True, slots=True)
class AzureRoute:
    """A chat-completions URL: the deployment in the path (None on the v1 route) and
    the ``api-version`` query value (None when absent)."""

    deployment: str | None
    api_version: str | None
    v1: bool


def parse_route(path: str, query: str) -> AzureRoute | None:
    """The Azure chat route ``path`` names, or None for any other path."""
    version = _api_version(query)
    if path == V1_CHAT_PATH:
        return AzureRoute(None, version, v1=True)
    if path.startswith(DEPLOYMENT_PREFIX) and path.endswith(CHAT_SUFFIX):
        name = unquote(path[len(DEPLOYMENT_PREFIX) : -len(CHAT_SUFFIX)])
        if name and "/" not in name:
            return AzureRoute(name, version, v1=False)
    return None


def _api_version(query: str) -> str | None:
    # The usual query is exactly "api-version=V": skip the general parser for it.
    if query.startswith("api-version=") and "&" not in query and "%" not in query and "+" not in query:
        return query[len("api-version=") :] or None
    values = parse_qs(query).get("api-version")
    return values[0] if values and values[0] else None


def version_error(route: AzureRoute, supported: frozenset[str]) -> ErrorResponse | None:
    """Azure's answer to a missing or unsupported ``api-version``, or None when it is fine."""
    if route.v1:
        return None if route.api_version in (None, *V1_API_VERSIONS) else api_version_not_supported()
    if route.api_version is None:
        return resource_not_found()
    return None if route.api_version in supported else api_version_not_supported()


def _error(status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()) -> ErrorResponse:
    return ErrorResponse(status, orjson.dumps({"error": {"code": code, "message": message}}), headers)


def resource_not_found() -> ErrorResponse:
    """404 for an unknown path, or the classic route without ``api-version``."""
    return _error(404, "404", "Resource not found")


def api_version_not_supported() -> ErrorResponse:
    """400 for an ``api-version`` Azure does not serve."""
    return _error(400, "BadRequest", "API version not supported")


def invalid_key() -> ErrorResponse:
    """401 for a missing or wrong ``api-key``."""
    return _error(
        401,
        "401",
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide "
        "a valid key for an active subscription and use a correct regional API endpoint for your "
        "resource.",
    )


def token_refused() -> ErrorResponse:
    """401 for ``Authorization: Bearer`` without ``api-key``: the simulator takes no Entra token."""
    message = (
        "Unauthorized. Access token is missing, invalid, audience is incorrect "
        "(https://cognitiveservices.azure.com), or have expired."
    )
    return ErrorResponse(401, orjson.dumps({"statusCode": 401, "message": message}))


def deployment_not_found() -> ErrorResponse:
    """404 for a deployment the resource does not have."""
    return _error(
        404,
        "DeploymentNotFound",
        "The API deployment for this resource does not exist. If you created the deployment "
        "within the last 5 minutes, please wait a moment and try again.",
    )


def rate_limited(api_version: str, kind: str, retry_ms: int | None) -> ErrorResponse:
    """429 with Azure's wording; ``retry-after`` (whole seconds) and ``retry-after-ms``."""
    wait_ms = DEFAULT_RETRY_AFTER_MS if retry_ms is None else retry_ms
    seconds = max(1, math.ceil(wait_ms / 1000))
    which = "call" if kind == "requests" else "token"
    message = (
        f"Requests to the ChatCompletions_Create Operation under Azure OpenAI API version "
        f"{api_version} have exceeded {which} rate limit of your current OpenAI S0 pricing tier. "
        f"Please retry after {seconds} seconds. Please go here: https://aka.ms/oai/quotaincrease "
        "if you would like to further increase the default rate limit."
    )
    return _error(429, "429", message, (("retry-after", str(seconds)), ("retry-after-ms", str(wait_ms))))


def server_error(request_id: str) -> ErrorResponse:
    """500: the model service's OpenAI-shaped body, in Azure's words."""
    message = (
        "The server had an error while processing your request. Sorry about that! You can retry "
        "your request, or contact us through an Azure support request at: "
        "https://go.microsoft.com/fwlink/?linkid=2213926 if the error persists. (Please include "
        f"the request ID {request_id} in your message.)"
    )
    return ErrorResponse(500, error_body(message, "server_error"))


def content_filter_refusal() -> ErrorResponse:
    """400 for a prompt the content filter refused (``content_filter``)."""
    verdict = {**PROMPT_RESULTS, "violence": {"filtered": True, "severity": "medium"}}
    body = {
        "error": {
            "message": "The response was filtered due to the prompt triggering Azure OpenAI's content "
            "management policy. Please modify your prompt and retry. To learn more about our content "
            "filtering policies please read our documentation: https://go.microsoft.com/fwlink/?linkid=2198766",
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": verdict},
        }
    }
    return ErrorResponse(400, orjson.dumps(body))


def authenticate(
    headers: Mapping[str, str], ring: KeyRing, *, v1: bool
) -> tuple[KeySeen, ErrorResponse | None]:
    """Read ``api-key``. On the v1 route a bearer token is the key too (the plain OpenAI
    client sends the key that way); on the classic route it is an Entra token, which
    the simulator cannot verify, so it is refused."""
    secret = api_key(headers)
    if secret is None:
        token = bearer_token(headers)
        if token is not None and v1:
            key = ring.seen("bearer", token)
            return key, None if ring.accepts(key) else invalid_key()
        if token is not None:
            return ring.seen("bearer", token), token_refused()
        return KeySeen(), invalid_key()
    key = ring.seen("api-key", secret)
    return key, None if ring.accepts(key) else invalid_key()


def scenario_error(scenario: Scenario, model: str, api_version: str, request_id: str) -> ErrorResponse:
    """An error scenario in Azure's shape where Azure has one of its own, else OpenAI's
    (the model service's bodies pass through Azure unchanged)."""
    if scenario.content_filter:
        return content_filter_refusal()
    status = scenario.status
    if scenario.rate_limit or status == 429:
        retry_ms = scenario.retry_after_ms
        if retry_ms is None and scenario.retry_after is not None:
            retry_ms = scenario.retry_after * 1000
        error = rate_limited(api_version, "requests", retry_ms)
        return _with(error, scenario, keep_retry=not scenario.no_retry_after)
    if status == 401:
        error = invalid_key()
    elif status == 404:
        error = deployment_not_found()
    elif status == 500:
        error = server_error(request_id)
    else:
        return openai_scenario_error(scenario, model)
    headers = tuple(retry_headers(scenario, scenario.retry_after_ms, scenario.retry_after))
    return _with(ErrorResponse(error.status, error.body, headers), scenario, keep_retry=True)


def _with(error: ErrorResponse, scenario: Scenario, *, keep_retry: bool) -> ErrorResponse:
    headers = error.headers if keep_retry else ()
    if scenario.should_retry is not None:
        headers += (("x-should-retry", "true" if scenario.should_retry else "false"),)
    return ErrorResponse(error.status, error.body, headers)


def budget_refusal(refusal: Refusal, api_version: str, window_s: float) -> ErrorResponse:
    """429 for a request the budget cannot pay for; a request larger than the whole
    limit is told to wait a full window (Azure has no separate "too large" answer)."""
    wait = round(window_s * 1000) if refusal.too_large else refusal.retry_after_ms
    return rate_limited(api_version, refusal.kind, wait)


def response_headers(headroom: Headroom) -> list[tuple[str, str]]:
    """Headers on every Azure chat response: its request id, region, and remaining headroom."""
    return [("apim-request-id", _uuid()), ("x-ms-region", REGION), *azure_headers(headroom)]


def _uuid() -> str:
    """A random id in UUID form, as Azure's ids look (cheaper than ``uuid.uuid4()``)."""
    hex_ = f"{getrandbits(128):032x}"
    return f"{hex_[:8]}-{hex_[8:12]}-{hex_[12:16]}-{hex_[16:20]}-{hex_[20:]}"
