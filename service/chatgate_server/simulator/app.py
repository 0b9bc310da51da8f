"""Routing and the chat-completions handler: request → record → plan → bytes on the wire.

A response is first turned into a ``Plan`` (``plan``), which the ``Sender``
(``sending``) writes at once or over time.

A chat request passes its checks in the order the real service makes them (for
Azure: api-version, key, body, deployment), then pays the rate-limit budget, then
meets its scenario. What differs between OpenAI and Azure is the ``Flavor``'s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from random import getrandbits
from typing import Any

import orjson

from . import azure
from .azure import AzureRoute
from .connection import Connection
from .content import Reply, cut_by_filter, estimate_prompt_tokens, plan_reply, resolve_model
from .errors import (
    ErrorResponse,
    bad_request,
    context_length_exceeded,
    invalid_url,
)
from .flavor import AzureFlavor, Flavor, OpenAIFlavor
from .keys import KeyRing, KeySeen
from .models import context_window
from .plan import Plan, apply_stream_faults
from .ratelimit import RateBudget
from .records import Recorder, RequestRecord, public_headers
from .scenario import EMPTY, Scenario, ScenarioError, parse_scenario, split_model
from .sending import Sender
from .stream import (
    DONE_EVENT,
    PROMPT_FILTER_EVENT,
    Event,
    completion_body,
    event_prefix,
    served_tier,
    stream_events,
    usage_event,
)
from .wire import Request, full_response

CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
SCENARIO_HEADER = "x-simulator-scenario"
CLIENT_REQUEST_ID_HEADER = "x-client-request-id"

_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream\r\n"
    b"transfer-encoding: chunked\r\n"
    b"cache-control: no-cache\r\n"
)
_KEEP_ALIVE_END = b"connection: keep-alive\r\n\r\n"
_CLOSE_END = b"connection: close\r\n\r\n"


@dataclass(slots=True)
class Chat:
    """One chat request as the checks see it: what it names, its scenario, its key."""

    body: dict[str, Any]
    body_error: str | None
    name: str  # the model (OpenAI, Azure v1) or deployment (Azure classic) asked for
    model: str  # the model that serves it ("" when unknown)
    scenario: Scenario
    spec_error: str | None
    key: KeySeen
    auth_error: ErrorResponse | None
    request_id: str
    prompt_tokens: int  # the estimate, once: the window check, the budget and usage use it


class SimulatorApp:
    """Handles every request of every connection; owns the records and the stream tasks."""

    def __init__(
        self,
        recorder: Recorder,
        *,
        chunks: int,
        delay_ms: int,
        any_model: bool = False,
        flavor: Flavor | None = None,
        keys: KeyRing | None = None,
        budget: RateBudget | None = None,
    ) -> None:
        self.recorder = recorder
        self.chunks = chunks
        self.delay_ms = delay_ms
        self.any_model = any_model
        self.flavor: Flavor = flavor or OpenAIFlavor()
        self.keys = keys or KeyRing()
        self.budget = budget or RateBudget()
        # The instance-wide scenario (Simulator.set_scenario), joined before each request's.
        self.scenario_text = ""
        self.sender = Sender(recorder)

    def dispatch(self, request: Request, conn: Connection) -> None:
        """Route one request (the ``Connection``'s callback)."""
        method, path = request.method, request.path
        if method == "POST" and path in CHAT_PATHS and self.flavor.name == "openai":
            self._chat(request, conn, None)
        elif (
            method == "POST"
            and self.flavor.name == "azure"
            and (route := azure.parse_route(path, request.query))
        ):
            self._chat(request, conn, route)
        elif method == "GET" and path == "/health":
            self._reply(conn, 200, b'{"status":"ok"}')
        elif path.startswith("/_simulator/"):
            self._control(request, conn)
        else:
            error = invalid_url(method, path) if self.flavor.name == "openai" else azure.resource_not_found()
            self._reply(conn, error.status, error.body)

    def _control(self, request: Request, conn: Connection) -> None:
        """The test endpoints: stats, reset, the rate-limit budget, the instance scenario."""
        method, path = request.method, request.path
        if method == "GET" and path == "/_simulator/stats":
            self._reply(conn, 200, self.recorder.stats_json())
        elif method == "POST" and path == "/_simulator/reset":
            self.recorder.reset()
            self._reply(conn, 200, b'{"ok":true}')
        elif path == "/_simulator/ratelimit" and method in ("GET", "POST"):
            self._ratelimit_control(request, conn)
        elif path == "/_simulator/scenario" and method in ("GET", "POST"):
            self._scenario_control(request, conn)
        else:
            error = invalid_url(method, path)
            self._reply(conn, error.status, error.body)

    def _ratelimit_control(self, request: Request, conn: Connection) -> None:
        try:
            if request.method == "POST":
                self.budget.set(**_budget_fields(request.body))
        except ValueError as exc:
            self._reply(conn, 400, orjson.dumps({"error": str(exc)}))
            return
        self._reply(conn, 200, orjson.dumps(self.budget.headroom()))

    def _scenario_control(self, request: Request, conn: Connection) -> None:
        if request.method == "POST":
            try:
                self.set_scenario(_scenario_field(request.body))
            except (ValueError, ScenarioError) as exc:
                self._reply(conn, 400, orjson.dumps({"error": str(exc)}))
                return
        self._reply(conn, 200, orjson.dumps({"scenario": self.scenario_text}))

    def set_scenario(self, text: str) -> None:
        """Make ``text`` every request's scenario (its own items still win). Raises ScenarioError."""
        parse_scenario(text)
        self.scenario_text = text.strip()

    def _reply(self, conn: Connection, status: int, body: bytes) -> None:
        conn.write(full_response(status, "application/json", body, [], keep_alive=conn.keep_alive))
        conn.end_response()

    # chat completions

    def _chat(self, request: Request, conn: Connection, route: AzureRoute | None) -> None:
        chat = self._read(request, route)
        spec_text = chat.scenario.text
        client_id = request.headers.get(CLIENT_REQUEST_ID_HEADER)
        attempt_key = f"id:{client_id}" if client_id else f"spec:{spec_text}" if spec_text else None
        record = RequestRecord(
            spec=chat.scenario,
            model=chat.model or chat.name,
            body=chat.body,
            headers=public_headers(request.headers),
            had_auth=chat.key.present,
            attempt=self.recorder.next_attempt(attempt_key) if attempt_key else 1,
            stream=chat.body.get("stream") is True,
            request_id=chat.request_id,
            path=request.path,
            auth_scheme=chat.key.scheme,
            key_fingerprint=chat.key.fingerprint,
            key_name=chat.key.name,
            deployment=chat.name if route is not None else None,
            api_version=route.api_version if route is not None else None,
        )
        self.recorder.begin(record)
        faulty = chat.scenario.applies_to(record.attempt)
        api_version = (route.api_version if route else None) or "v1"
        early = (azure.version_error(route, self._api_versions()) if route else None) or chat.auth_error
        if early is not None:
            # Refused before the key was accepted: no headroom to report.
            plan = self._error_plan(early, self.flavor.headers(chat.request_id, None), conn.keep_alive)
        else:
            error = self._check(chat, faulty, api_version)
            headers = self.flavor.headers(chat.request_id, self.budget.headroom())
            if error is not None:
                plan = self._error_plan(error, headers, conn.keep_alive)
            else:
                plan = self._answer_plan(chat, faulty, headers, conn.keep_alive)
        if chat.scenario.headers_delay_ms and faulty:
            plan.headers_delay += chat.scenario.headers_delay_ms / 1000
        self.sender.execute(conn, record, plan)

    def _api_versions(self) -> frozenset[str]:
        return self.flavor.api_versions if isinstance(self.flavor, AzureFlavor) else azure.API_VERSIONS

    def _read(self, request: Request, route: AzureRoute | None) -> Chat:
        """Parse the body, find what it names and its scenario, read the key."""
        body, body_error = _parse_body(request.body)
        raw_model = body.get("model")
        name, body_suffix = split_model(raw_model) if isinstance(raw_model, str) else ("", "")
        path_suffix = ""
        if route is not None and route.deployment is not None:
            # Classic Azure: the deployment in the path names the model; the body's is ignored
            # (but a scenario suffix on either still counts).
            name, path_suffix = split_model(route.deployment)
        parts = (
            self.scenario_text,
            request.headers.get(SCENARIO_HEADER, "").strip(),
            body_suffix,
            path_suffix,
        )
        spec_text = ",".join(p.strip() for p in parts if p.strip())
        scenario: Scenario = EMPTY
        spec_error: str | None = None
        try:
            scenario = parse_scenario(spec_text)
        except ScenarioError as exc:
            spec_error = str(exc)
        if isinstance(self.flavor, AzureFlavor):
            model = (self.flavor.model_for(name) or "") if name else ""
        else:
            model = name if name and context_window(name, any_model=self.any_model) is not None else ""
        key, auth_error = self.flavor.authenticate(
            request.headers, self.keys, v1=route is not None and route.v1
        )
        request_id = f"req_{getrandbits(128):032x}"
        tokens = estimate_prompt_tokens(body)
        return Chat(body, body_error, name, model, scenario, spec_error, key, auth_error, request_id, tokens)

    def _check(self, chat: Chat, faulty: bool, api_version: str) -> ErrorResponse | None:
        """The first error the request meets after authentication; None to answer it."""
        scenario = chat.scenario
        if chat.body_error is not None:
            return bad_request(chat.body_error)
        if not chat.name:
            return bad_request("you must provide a model parameter")
        if chat.spec_error is not None:
            return bad_request(f"simulator scenario: {chat.spec_error}", param="model")
        if not chat.model:
            return self.flavor.unknown_model(chat.name)
        window = context_window(chat.model, any_model=True)
        assert window is not None
        if (too_long := _context_error(chat.body, chat.prompt_tokens, window)) is not None:
            return too_long
        refusal = self.budget.spend(self._token_cost(chat))
        if refusal is not None:
            return self.flavor.budget_refusal(
                refusal, chat.model, api_version, self.budget.headroom().window_s
            )
        if faulty and scenario.error_status is not None:
            return self.flavor.scenario_error(scenario, chat.model, api_version, chat.request_id)
        return None

    def _token_cost(self, chat: Chat) -> int:
        """What the request spends of the token budget: its prompt plus the completion room
        it asks for (max_completion_tokens / max_tokens), else the reply's chunk count."""
        limit = chat.body.get("max_completion_tokens", chat.body.get("max_tokens"))
        if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
            limit = self.chunks if chat.scenario.chunks is None else chat.scenario.chunks
        return chat.prompt_tokens + limit

    def _error_plan(self, error: ErrorResponse, headers: list[tuple[str, str]], keep_alive: bool) -> Plan:
        if any(name == "x-ratelimit-remaining-requests" for name, _ in error.headers):
            # The error states its own headroom (the rate_limit scenario).
            headers = [(n, v) for n, v in headers if not n.startswith("x-ratelimit-")]
        head = full_response(
            error.status, "application/json", error.body, [*headers, *error.headers], keep_alive=keep_alive
        )
        return Plan(status=error.status, head=head)

    def _answer_plan(
        self, chat: Chat, faulty: bool, headers: list[tuple[str, str]], keep_alive: bool
    ) -> Plan:
        scenario = chat.scenario
        chunks = self.chunks if scenario.chunks is None else scenario.chunks
        reply = plan_reply(
            chat.body, chunks=chunks, refusal=scenario.refusal, parallel_tools=scenario.parallel_tools
        )
        if faulty and scenario.content_filter_after is not None:
            reply = cut_by_filter(reply, scenario.content_filter_after)
        delay_ms = self.delay_ms if scenario.delay_ms is None else scenario.delay_ms
        if chat.body.get("stream") is True:
            return self._stream_plan(chat, reply, faulty, headers, keep_alive, delay_ms)
        return self._completion_plan(chat, reply, faulty, headers, keep_alive, delay_ms)

    def _stream_plan(
        self,
        chat: Chat,
        reply: Reply,
        faulty: bool,
        headers: list[tuple[str, str]],
        keep_alive: bool,
        delay_ms: int,
    ) -> Plan:
        scenario, style = chat.scenario, self.flavor.style
        prefix = event_prefix(
            f"chatcmpl-sim-{getrandbits(96):024x}",
            int(time.time()),
            resolve_model(chat.model),
            served_tier(chat.body),
        )
        events: list[Event] = [(PROMPT_FILTER_EVENT, False)] if style.azure else []
        events += stream_events(reply, prefix, style, logprobs=_logprobs_asked(chat.body))
        options = chat.body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True and not scenario.no_usage:
            usage = usage_event(prefix, chat.prompt_tokens, reply.completion_tokens)
            events.append((usage, False))
        if not scenario.no_done:
            events.append((DONE_EVENT, False))
        lines = b"".join(f"{name}: {value}\r\n".encode("latin-1") for name, value in headers)
        head = _STREAM_HEAD + lines + (_KEEP_ALIVE_END if keep_alive else _CLOSE_END)
        plan = Plan(status=200, head=head, events=events, chunked=True, delay=delay_ms / 1000)
        if faulty:
            apply_stream_faults(plan, scenario)
        return plan

    def _completion_plan(
        self,
        chat: Chat,
        reply: Reply,
        faulty: bool,
        headers: list[tuple[str, str]],
        keep_alive: bool,
        delay_ms: int,
    ) -> Plan:
        scenario = chat.scenario
        data = completion_body(
            reply,
            completion_id=f"chatcmpl-sim-{getrandbits(96):024x}",
            created=int(time.time()),
            model=resolve_model(chat.model),
            prompt_tokens=chat.prompt_tokens,
            style=self.flavor.style,
        )
        head = full_response(200, "application/json", data, headers, keep_alive=keep_alive)
        # Without a stream the whole generation time passes before the headers.
        plan = Plan(status=200, head=head, headers_delay=delay_ms * reply.content_chunks / 1000)
        if faulty:
            # Stream-shape faults have no chunks to act on here: stalls hang, and a
            # disconnect closes before any response byte. The others do not apply.
            if scenario.hang or scenario.stall_after is not None:
                plan.end, plan.status = "hang", None
            elif scenario.disconnect_after is not None:
                plan.end, plan.status, plan.head = "disconnect", None, b""
        return plan


def _logprobs_asked(body: dict[str, Any]) -> int | None:
    """With ``logprobs: true``: how many alternatives per token (``top_logprobs``, else 0)."""
    if body.get("logprobs") is not True:
        return None
    top = body.get("top_logprobs")
    return top if isinstance(top, int) and not isinstance(top, bool) and 0 <= top <= 20 else 0


def _context_error(body: dict[str, Any], prompt: int, window: int) -> ErrorResponse | None:
    """The 400 for a prompt that, with the completion room it asks for, exceeds ``window``."""
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    completion = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None
    if prompt + (completion or 0) > window:
        return context_length_exceeded(window, prompt, completion)
    return None


def _parse_body(raw: bytes) -> tuple[dict[str, Any], str | None]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}, (
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
            "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
            "sent was not valid JSON.)"
        )
    if not isinstance(body, dict):
        return {}, "The request body must be a JSON object."
    return body, None


_BUDGET_FIELDS = frozenset(
    {"limit_requests", "limit_tokens", "remaining_requests", "remaining_tokens", "window_s"}
)


def _json_object(raw: bytes) -> dict[str, Any]:
    """A control endpoint's JSON object body (empty body: ``{}``). Raises ValueError."""
    if not raw.strip():
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValueError("the body is not JSON") from None
    if not isinstance(value, dict):
        raise ValueError("the body must be a JSON object")  # noqa: TRY004 - every bad body is one 400
    return value


def _budget_fields(raw: bytes) -> dict[str, Any]:
    """The budget settings a ``POST /_simulator/ratelimit`` asks for. Raises ValueError."""
    values = _json_object(raw)
    unknown = set(values) - _BUDGET_FIELDS
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
    return values


def _scenario_field(raw: bytes) -> str:
    """The spec a ``POST /_simulator/scenario`` sets. Raises ValueError."""
    text = _json_object(raw).get("scenario", "")
    if not isinstance(text, str):
        raise ValueError("'scenario' must be a string")  # noqa: TRY004 - every bad body is one 400
    return text
