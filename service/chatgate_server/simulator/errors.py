"""OpenAI-shaped error responses: ``{"error": {"message", "type", "param", "code"}}``.

Bodies and messages follow what api.openai.com sends for each status (the error
bodies OpenAI documents). None of them ever echoes the caller's API key.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from .ratelimit import Refusal, go_duration
from .scenario import Scenario

# (message, type, param, code) per status for the `status=CODE` scenario.
_BY_STATUS: dict[int, tuple[str, str, str | None, str | None]] = {
    400: (
        "Invalid 'messages': empty array. Expected an array with minimum length 1, "
        "but got an empty array instead.",
        "invalid_request_error",
        "messages",
        "empty_array",
    ),
    401: (
        # The real API echoes a masked key here; the simulator shows a fixed mask instead.
        "Incorrect API key provided: sk-sim*****. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        "invalid_request_error",
        None,
        "invalid_api_key",
    ),
    403: ("Country, region, or territory not supported", "request_forbidden", None,
          "unsupported_country_region_territory"),
    404: ("The model `{model}` does not exist or you do not have access to it.",
          "invalid_request_error", None, "model_not_found"),
    408: ("Request timed out.", "timeout", None, None),
    409: ("The request conflicted with another request. Please try again.", "invalid_request_error",
          None, "conflict"),
    422: ("Unprocessable request.", "invalid_request_error", None, None),
    500: ("The server had an error while processing your request. Sorry about that!",
          "server_error", None, None),
    502: ("Bad gateway.", "server_error", None, None),
    503: ("Slow Down", "server_error", None, "slow_down"),
}  # fmt: skip

MISSING_KEY_MESSAGE = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password "
    "field (with blank username) if you're accessing the API from your browser and are "
    "prompted for a username and password. You can obtain an API key from "
    "https://platform.openai.com/account/api-keys."
)

# The event the real API sends when it fails after the 200 has started.
ERROR_EVENT = (
    b'data: {"error": {"message": "The server had an error while processing your request.", '
    b'"type": "server_error", "param": null, "code": null}}\n\n'
)
MALFORMED_EVENT = b"data: {not json\n\n"

DEFAULT_RETRY_AFTER_MS = 100


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """A complete error answer: status, extra headers and the JSON body."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    """The JSON bytes of an OpenAI error object."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def missing_key() -> ErrorResponse:
    """401 for a request without a usable ``Authorization: Bearer`` header."""
    return ErrorResponse(401, error_body(MISSING_KEY_MESSAGE, "invalid_request_error"))


def invalid_api_key() -> ErrorResponse:
    """401 for a key that is not on the simulator's allow-list."""
    message, type_, param, code = _BY_STATUS[401]
    return ErrorResponse(401, error_body(message, type_, param, code))


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    """400 invalid_request_error (bad JSON, missing model, bad scenario spec)."""
    return ErrorResponse(400, error_body(message, "invalid_request_error", param, code))


def model_not_found(model: str) -> ErrorResponse:
    """404 for a model the simulator does not serve, as the real API words it."""
    message, type_, param, code = _BY_STATUS[404]
    return ErrorResponse(404, error_body(message.replace("{model}", model), type_, param, code))


def context_length_exceeded(window: int, prompt_tokens: int, completion_tokens: int | None) -> ErrorResponse:
    """400 for a prompt (plus the completion room asked for) longer than the model's window.

    The real API words it two ways: the messages alone are too long, or they fit but
    not with the ``max_tokens`` asked for.
    """
    if completion_tokens is None or prompt_tokens > window:
        message = (
            f"This model's maximum context length is {window} tokens. However, your messages "
            f"resulted in {prompt_tokens} tokens. Please reduce the length of the messages."
        )
    else:
        message = (
            f"This model's maximum context length is {window} tokens. However, you requested "
            f"{prompt_tokens + completion_tokens} tokens ({prompt_tokens} in the messages, "
            f"{completion_tokens} in the completion). Please reduce the length of the messages "
            "or completion."
        )
    return bad_request(message, param="messages", code="context_length_exceeded")


def invalid_url(method: str, path: str) -> ErrorResponse:
    """404 for an unknown route, worded as the real API words it."""
    return ErrorResponse(404, error_body(f"Invalid URL ({method} {path})", "invalid_request_error"))


def scenario_error(scenario: Scenario, model: str) -> ErrorResponse:
    """The error response an error scenario (status / rate_limit / …) asks for."""
    headers: list[tuple[str, str]] = []
    if scenario.rate_limit:
        retry_ms = scenario.retry_after_ms
        if retry_ms is None and scenario.retry_after is None:
            retry_ms = DEFAULT_RETRY_AFTER_MS
        wait = go_duration(retry_ms if retry_ms is not None else (scenario.retry_after or 0) * 1000)
        message = (
            f"Rate limit reached for {model} in organization org-simulator on requests per min "
            f"(RPM): Limit 500, Used 500, Requested 1. Please try again in {wait}. Visit "
            "https://platform.openai.com/account/rate-limits to learn more."
        )
        body = error_body(message, "requests", None, "rate_limit_exceeded")
        headers += _ratelimit_headers(wait)
        headers += retry_headers(scenario, retry_ms, scenario.retry_after)
    elif scenario.insufficient_quota:
        message = (
            "You exceeded your current quota, please check your plan and billing details. "
            "For more information on this error, read the docs: "
            "https://platform.openai.com/docs/guides/error-codes/api-errors."
        )
        body = error_body(message, "insufficient_quota", None, "insufficient_quota")
        headers += retry_headers(scenario, scenario.retry_after_ms, scenario.retry_after)
    elif scenario.too_large:
        message = (
            f"Request too large for {model} in organization org-simulator on tokens per min "
            "(TPM): Limit 30000, Requested 45000. The input or output tokens must be reduced "
            "in order to run successfully. Visit https://platform.openai.com/account/rate-limits "
            "to learn more."
        )
        body = error_body(message, "tokens", None, "rate_limit_exceeded")
        headers += retry_headers(scenario, scenario.retry_after_ms, scenario.retry_after)
    else:
        status = scenario.status or 500
        message, type_, param, code = _BY_STATUS.get(status, _generic(status))
        body = error_body(message.replace("{model}", model), type_, param, code)
        headers += retry_headers(scenario, scenario.retry_after_ms, scenario.retry_after)
    if scenario.should_retry is not None:
        headers.append(("x-should-retry", "true" if scenario.should_retry else "false"))
    return ErrorResponse(scenario.error_status or 500, body, tuple(headers))


def _generic(status: int) -> tuple[str, str, str | None, str | None]:
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    return f"Simulated HTTP {status} error.", type_, None, None


def retry_headers(scenario: Scenario, retry_ms: int | None, retry_s: int | None) -> list[tuple[str, str]]:
    """The retry-after headers a scenario asks for (none with ``no_retry_after``)."""
    if scenario.no_retry_after:
        return []
    headers: list[tuple[str, str]] = []
    if retry_ms is not None:
        headers.append(("retry-after-ms", str(retry_ms)))
    if retry_s is not None:
        headers.append(("retry-after", str(retry_s)))
    return headers


def _ratelimit_headers(reset: str) -> list[tuple[str, str]]:
    return [
        ("x-ratelimit-limit-requests", "500"),
        ("x-ratelimit-remaining-requests", "0"),
        ("x-ratelimit-reset-requests", reset),
        ("x-ratelimit-limit-tokens", "30000"),
        ("x-ratelimit-remaining-tokens", "29000"),
        ("x-ratelimit-reset-tokens", "2ms"),
    ]


def budget_refusal(refusal: Refusal, model: str) -> ErrorResponse:
    """The 429 for a request the rate-limit budget cannot pay for, worded as OpenAI words it."""
    per = "requests per min (RPM)" if refusal.kind == "requests" else "tokens per min (TPM)"
    if refusal.too_large:
        message = (
            f"Request too large for {model} in organization org-simulator on {per}: Limit "
            f"{refusal.limit}, Requested {refusal.requested}. The input or output tokens must be "
            "reduced in order to run successfully. Visit https://platform.openai.com/account/rate-limits "
            "to learn more."
        )
        return ErrorResponse(429, error_body(message, refusal.kind, None, "rate_limit_exceeded"))
    message = (
        f"Rate limit reached for {model} in organization org-simulator on {per}: Limit "
        f"{refusal.limit}, Used {refusal.used}, Requested {refusal.requested}. Please try again in "
        f"{go_duration(refusal.retry_after_ms)}. Visit https://platform.openai.com/account/rate-limits "
        "to learn more."
    )
    headers = (
        ("retry-after-ms", str(refusal.retry_after_ms)),
        ("retry-after", str(max(1, -(-refusal.retry_after_ms // 1000)))),
    )
    return ErrorResponse(429, error_body(message, refusal.kind, None, "rate_limit_exceeded"), headers)
