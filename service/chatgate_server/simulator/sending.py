"""Sending a planned response: at once, or over time in a task the client's leaving cancels.

Plans without delays or stalls are written in one go from ``data_received`` (the
benchmark path: no task, one ``write``); the others run in a task that the connection
cancels as soon as the client goes away (or ``stop()`` cancels).
"""

from __future__ import annotations

import asyncio

from .connection import Connection
from .plan import Plan
from .records import Recorder, RequestRecord
from .stream import Event
from .wire import LAST_CHUNK, frame_chunk


async def _forever() -> None:
    # Parked until the connection reports the client gone and cancels the task.
    await asyncio.get_running_loop().create_future()


class Sender:
    """Writes plans to connections; owns the tasks of the responses that take time."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.tasks: set[asyncio.Task[None]] = set()
        # While stopping, connections cut by the server are not the client closing early.
        self.stopping = False

    def execute(self, conn: Connection, record: RequestRecord, plan: Plan) -> None:
        """Send ``plan`` now, or start the task that sends it over time."""
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
