"""What a caller may do with a stream that shutdown cut: the contract, checked.

chat.proto, docs/CALLING.md and both clients say the same thing, and this is why: the
tokens of a cut stream were delivered and billed, so retrying is not free, and the same
``request_id`` is refused on another replica as already served. A call refused at once
(no event) is the one that is safe to retry elsewhere.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc

from chatgate.client import AsyncClient, ChatgateError, Event, Finished, Outcome, build_request, user
from chatgate_server.app import App
from tests.integration.conftest import AppFactory


async def run(app: App, request_id: str, model: str, stop_after: int | None = None) -> list[Event]:
    """Stream one call; with ``stop_after``, start shutting ``app`` down after that many events."""
    events: list[Event] = []
    stopping: asyncio.Task[None] | None = None
    async with AsyncClient(f"127.0.0.1:{app.port}", timeout=30) as client:
        request = build_request(model, [user("Hello!")], user_id="u-shutdown", request_id=request_id)
        try:
            async for event in client.complete(request):
                events.append(event)
                if len(events) == stop_after:
                    stopping = asyncio.create_task(app.stop(0))
        finally:
            if stopping is not None:
                await stopping
    return events


async def test_a_stream_cut_by_shutdown_is_billed_so_its_retry_is_refused(start_app: AppFactory) -> None:
    request_id = f"cut-{uuid.uuid4().hex}"
    first = await start_app()
    try:
        await run(first, request_id, "gpt-4o-mini::chunks=200,delay_ms=20", stop_after=3)
    except ChatgateError as error:
        cut = error
    else:
        raise AssertionError("the stream was not cut")
    assert cut.code is grpc.StatusCode.UNAVAILABLE and cut.reason == "SHUTTING_DOWN"
    assert cut.events_received >= 3
    assert cut.retryable is False  # the client's rule: events arrived, so they were billed

    second = await start_app()  # another replica, same database
    try:
        await run(second, request_id, "gpt-4o-mini::chunks=200,delay_ms=20")
    except ChatgateError as error:
        retry = error
    else:
        raise AssertionError("the retry of a billed stream ran again")
    assert retry.code is grpc.StatusCode.ALREADY_EXISTS and retry.reason == "DUPLICATE_REQUEST_ID"
    assert "already served" in retry.message


async def test_a_call_refused_while_draining_got_nothing_and_may_go_elsewhere(start_app: AppFactory) -> None:
    request_id = f"refused-{uuid.uuid4().hex}"
    draining = await start_app()
    assert draining.service is not None
    draining.service.stop_admitting()
    try:
        await run(draining, request_id, "gpt-4o-mini")
    except ChatgateError as error:
        refused = error
    else:
        raise AssertionError("a draining replica took a new call")
    assert refused.reason == "SHUTTING_DOWN" and refused.events_received == 0
    assert refused.retryable is True

    other = await start_app()
    events = await run(other, request_id, "gpt-4o-mini")  # the same request_id runs there
    assert isinstance(events[-1], Finished) and events[-1].outcome is Outcome.COMPLETED


async def test_calls_grpc_queued_as_a_replica_stopped_are_answered_by_another(start_app: AppFactory) -> None:
    """gRPC's server core cancels the calls it received but had not yet handed to
    chatgate when the server stops (grpc/grpc#41785): they never ran, and the client's
    retry policy sends them to another replica instead of failing them CANCELLED."""
    stopping, other = await start_app(), await start_app()
    target = f"ipv4:127.0.0.1:{stopping.port},127.0.0.1:{other.port}"
    async with AsyncClient(target, timeout=30) as client:

        async def call() -> Outcome | grpc.StatusCode:
            request = build_request("gpt-4o-mini::chunks=2", [user("Hello!")], user_id="u-queued")
            try:
                return (await client.collect(request)).outcome
            except ChatgateError as error:
                return error.code

        assert {await call() for _ in range(4)} == {Outcome.COMPLETED}  # both replicas connected
        calls = [asyncio.create_task(call()) for _ in range(60)]
        await asyncio.sleep(0)
        # Hold this event loop (both servers run on it) while gRPC's threads carry the
        # calls in: they queue inside the servers' gRPC core, not yet handed to chatgate.
        time.sleep(0.1)  # noqa: ASYNC251 - blocking on purpose
        await stopping.stop(5)
        outcomes = await asyncio.gather(*calls)
    assert outcomes == [Outcome.COMPLETED] * len(calls)
