"""Routing and the chat-completions handler: request → record → plan → bytes on the wire.

A response is first turned into a ``Plan`` (head, body events, how it ends, delays).
Plans without delays or stalls are written in one go from ``data_received`` (the
benchmark path: no task, one ``write``); the others run in a task that the connection
cancels as soon as the client goes away.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from random import getrandbits
from typing import Any, Literal

import orjson

from .connection import Connection
from .content import estimate_prompt_tokens, plan_reply, resolve_model
from .errors import (
    ERROR_EVENT,
    MALFORMED_EVENT,
    ErrorResponse,
    bad_request,
    context_length_exceeded,
    invalid_url,
    missing_key,
    model_not_found,
    scenario_error,
)
from .models import context_window
from .records import Recorder, RequestRecord, public_headers
from .scenario import EMPTY, Scenario, ScenarioError, parse_scenario, split_model
from .stream import DONE_EVENT, Event, completion_body, event_prefix, stream_events, usage_event
from .wire import LAST_CHUNK, Request, frame_chunk, full_response

CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
SCENARIO_HEADER = "x-simulator-scenario"
CLIENT_REQUEST_ID_HEADER = "x-client-request-id"

_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream\r\n"
    b"transfer-encoding: chunked\r\n"
    b"cache-control: no-cache\r\n"
    b"openai-version: 2020-10-01\r\n"
    b"openai-processing-ms: 1\r\n"
    b"x-request-id: "
)
_KEEP_ALIVE_END = b"\r\nconnection: keep-alive\r\n\r\n"
_CLOSE_END = b"\r\nconnection: close\r\n\r\n"

End = Literal["finish", "stall", "disconnect", "hang"]


@dataclass(slots=True)
class Plan:
    """How one response goes out.

    ``head`` is sent first (for a non-chunked response it already holds the body);
    then each of ``events`` as its own HTTP chunk, ``delay`` seconds apart; then by
    ``end``: finish (chunk terminator if ``chunked``), stall (send nothing more),
    disconnect (close without the terminator) or hang (not even the head).
    """

    status: int | None
    head: bytes
    events: list[Event] = field(default_factory=list)
    chunked: bool = False
    end: End = "finish"
    headers_delay: float = 0.0
    delay: float = 0.0


async def _forever() -> None:
    # Parked until the connection reports the client gone and cancels the task.
    await asyncio.get_running_loop().create_future()


class SimulatorApp:
    """Handles every request of every connection; owns the records and the stream tasks."""

    def __init__(self, recorder: Recorder, *, chunks: int, delay_ms: int, any_model: bool = False) -> None:
        self.recorder = recorder
        self.chunks = chunks
        self.delay_ms = delay_ms
        self.any_model = any_model
        self.tasks: set[asyncio.Task[None]] = set()
        # While stopping, connections cut by the server are not the client closing early.
        self.stopping = False

    def dispatch(self, request: Request, conn: Connection) -> None:
        """Route one request (the ``Connection``'s callback)."""
        method, path = request.method, request.path
        if method == "POST" and path in CHAT_PATHS:
            self._chat(request, conn)
        elif method == "GET" and path == "/health":
            self._reply(conn, 200, b'{"status":"ok"}')
        elif method == "GET" and path == "/_simulator/stats":
            self._reply(conn, 200, self.recorder.stats_json())
        elif method == "POST" and path == "/_simulator/reset":
            self.recorder.reset()
            self._reply(conn, 200, b'{"ok":true}')
        else:
            error = invalid_url(method, path)
            self._reply(conn, error.status, error.body)

    def _reply(self, conn: Connection, status: int, body: bytes) -> None:
        conn.write(full_response(status, "application/json", body, [], keep_alive=conn.keep_alive))
        conn.end_response()

    # chat completions

    def _chat(self, request: Request, conn: Connection) -> None:
        headers = request.headers
        auth = headers.get("authorization", "")
        had_auth = auth[:7].lower() == "bearer " and bool(auth[7:].strip())
        request_id = f"req_{getrandbits(128):032x}"
        body, body_error = _parse_body(request.body)
        raw_model = body.get("model")
        model, suffix = split_model(raw_model) if isinstance(raw_model, str) else ("", "")
        spec_text = ",".join(s for s in (headers.get(SCENARIO_HEADER, "").strip(), suffix.strip()) if s)
        scenario: Scenario = EMPTY
        spec_error: str | None = None
        try:
            scenario = parse_scenario(spec_text)
        except ScenarioError as exc:
            spec_error = str(exc)
        client_id = headers.get(CLIENT_REQUEST_ID_HEADER)
        key = f"id:{client_id}" if client_id else f"spec:{spec_text}" if spec_text else None
        attempt = self.recorder.next_attempt(key) if key else 1
        stream = body.get("stream") is True
        record = RequestRecord(
            spec=scenario,
            model=model,
            body=body,
            headers=public_headers(headers),
            had_auth=had_auth,
            attempt=attempt,
            stream=stream,
            request_id=request_id,
            path=request.path,
        )
        self.recorder.begin(record)

        error: ErrorResponse | None = None
        faulty = scenario.applies_to(attempt)
        if not had_auth:
            error = missing_key()
        elif body_error is not None:
            error = bad_request(body_error)
        elif not model:
            error = bad_request("you must provide a model parameter")
        elif spec_error is not None:
            error = bad_request(f"simulator scenario: {spec_error}", param="model")
        elif (window := context_window(model, any_model=self.any_model)) is None:
            error = model_not_found(model)
        elif (too_long := _context_error(body, window)) is not None:
            error = too_long
        elif faulty and scenario.error_status is not None:
            error = scenario_error(scenario, model)

        if error is not None:
            plan = self._error_plan(error, request_id, conn.keep_alive)
        elif stream:
            plan = self._stream_plan(body, model, scenario, faulty, request_id, conn.keep_alive)
        else:
            plan = self._completion_plan(body, model, scenario, faulty, request_id, conn.keep_alive)
        if scenario.headers_delay_ms and faulty:
            plan.headers_delay += scenario.headers_delay_ms / 1000
        self._execute(conn, record, plan)

    def _error_plan(self, error: ErrorResponse, request_id: str, keep_alive: bool) -> Plan:
        headers = [("x-request-id", request_id), *error.headers]
        head = full_response(error.status, "application/json", error.body, headers, keep_alive=keep_alive)
        return Plan(status=error.status, head=head)

    def _stream_plan(
        self,
        body: dict[str, Any],
        model: str,
        scenario: Scenario,
        faulty: bool,
        request_id: str,
        keep_alive: bool,
    ) -> Plan:
        chunks = self.chunks if scenario.chunks is None else scenario.chunks
        delay_ms = self.delay_ms if scenario.delay_ms is None else scenario.delay_ms
        reply = plan_reply(
            body, chunks=chunks, refusal=scenario.refusal, parallel_tools=scenario.parallel_tools
        )
        prefix = event_prefix(f"chatcmpl-sim-{getrandbits(96):024x}", int(time.time()), resolve_model(model))
        events = stream_events(reply, prefix)
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True and not scenario.no_usage:
            usage = usage_event(prefix, estimate_prompt_tokens(body), reply.completion_tokens)
            events.append((usage, False))
        if not scenario.no_done:
            events.append((DONE_EVENT, False))
        head = _STREAM_HEAD + request_id.encode() + (_KEEP_ALIVE_END if keep_alive else _CLOSE_END)
        plan = Plan(status=200, head=head, events=events, chunked=True, delay=delay_ms / 1000)
        if faulty:
            _apply_stream_faults(plan, scenario)
        return plan

    def _completion_plan(
        self,
        body: dict[str, Any],
        model: str,
        scenario: Scenario,
        faulty: bool,
        request_id: str,
        keep_alive: bool,
    ) -> Plan:
        chunks = self.chunks if scenario.chunks is None else scenario.chunks
        delay_ms = self.delay_ms if scenario.delay_ms is None else scenario.delay_ms
        reply = plan_reply(
            body, chunks=chunks, refusal=scenario.refusal, parallel_tools=scenario.parallel_tools
        )
        data = completion_body(
            reply,
            completion_id=f"chatcmpl-sim-{getrandbits(96):024x}",
            created=int(time.time()),
            model=resolve_model(model),
            prompt_tokens=estimate_prompt_tokens(body),
        )
        head = full_response(
            200, "application/json", data, [("x-request-id", request_id)], keep_alive=keep_alive
        )
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

    # sending

    def _execute(self, conn: Connection, record: RequestRecord, plan: Plan) -> None:
        instant = not plan.headers_delay and not (plan.delay and plan.events)
        if instant and plan.end in ("finish", "disconnect"):
            self._send_now(conn, record, plan)
            return
        task = asyncio.get_running_loop().create_task(self._send_over_time(conn, record, plan))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        conn.watch(lambda: self._client_gone(record, task))

    def _send_now(self, conn: Connection, record: RequestRecord, plan: Plan) -> None:
        data = plan.head
        if plan.events:
            data += frame_chunk(b"".join([event for event, _ in plan.events]))
            record.content_chunks_sent = sum(1 for _, is_content in plan.events if is_content)
        if plan.status is not None:
            self.recorder.sent_status(record, plan.status)
        if plan.end == "disconnect":
            conn.write(data)
            self.recorder.end(record, aborted=True)
            conn.disconnect()
            return
        if plan.chunked:
            data += LAST_CHUNK
        conn.write(data)
        self.recorder.end(record, completed=True)
        conn.end_response()

    async def _send_over_time(self, conn: Connection, record: RequestRecord, plan: Plan) -> None:
        # Cancelled by _client_gone (or stop) at whichever await it is parked on.
        if plan.headers_delay:
            await asyncio.sleep(plan.headers_delay)
        if plan.end == "hang":
            await _forever()
        conn.write(plan.head)
        if plan.status is not None:
            self.recorder.sent_status(record, plan.status)
        if plan.delay:
            await self._send_paced(conn, record, plan.events, plan.delay)
        else:
            for event, is_content in plan.events:
                conn.write(frame_chunk(event))
                if is_content:
                    record.content_chunks_sent += 1
                if conn.paused:
                    await conn.drain()
        if plan.end == "stall":
            await _forever()
        if plan.end == "disconnect":
            self.recorder.end(record, aborted=True)
            conn.disconnect()
            return
        if plan.chunked:
            conn.write(LAST_CHUNK)
        self.recorder.end(record, completed=True)
        conn.end_response()

    @staticmethod
    async def _send_paced(conn: Connection, record: RequestRecord, events: list[Event], delay: float) -> None:
        """Event i goes out ``(i + 1) * delay`` after the head, on a schedule, not after
        a sleep per event: when this process is busy (thousands of paced streams), the
        events that fell due meanwhile leave together in one write, as a real upstream
        that keeps its own pace would have sent them. Sleeping ``delay`` after each write
        would instead slow every stream down with the simulator's own load."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = 0
        while sent < len(events):
            due_at = start + (sent + 1) * delay
            now = loop.time()
            if due_at > now:
                await asyncio.sleep(due_at - now)
                now = loop.time()
            due = min(len(events), sent + 1 + int((now - due_at) / delay))
            conn.write(b"".join(frame_chunk(event) for event, _ in events[sent:due]))
            record.content_chunks_sent += sum(1 for _, is_content in events[sent:due] if is_content)
            sent = due
            if conn.paused:
                await conn.drain()

    def _client_gone(self, record: RequestRecord, task: asyncio.Task[None]) -> None:
        if self.stopping:
            self.recorder.end(record, aborted=True)
        else:
            self.recorder.end(record, closed_early=True)
        task.cancel()


def _apply_stream_faults(plan: Plan, scenario: Scenario) -> None:
    events = plan.events
    if scenario.malformed_after is not None:
        events.insert(_cut(events, scenario.malformed_after), (MALFORMED_EVENT, False))
    if scenario.hang:
        plan.end, plan.status = "hang", None
    elif scenario.stall_after is not None:
        del events[_cut(events, scenario.stall_after) :]
        plan.end = "stall"
    elif scenario.disconnect_after is not None:
        del events[_cut(events, scenario.disconnect_after) :]
        plan.end = "disconnect"
    elif scenario.error_event_after is not None:
        del events[_cut(events, scenario.error_event_after) :]
        events.append((ERROR_EVENT, False))


def _cut(events: list[Event], n: int) -> int:
    """The index just past the n-th content event (before the finish chunk if fewer)."""
    seen = 0
    last_content = 0
    for i, (_, is_content) in enumerate(events):
        if is_content:
            if seen == n:
                return i
            seen += 1
            last_content = i
    return last_content + 1


def _context_error(body: dict[str, Any], window: int) -> ErrorResponse | None:
    """The 400 for a prompt that, with the completion room it asks for, exceeds ``window``."""
    prompt = estimate_prompt_tokens(body)
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
