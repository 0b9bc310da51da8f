"""The soak's callers: closed-loop streams with random scenarios, deadlines and cancels.

Each call carries its own ``request_id`` so the audit can match it to its usage row,
and asks the simulator for its behaviour through the model suffix
(``gpt-4o-mini::stall_after=3``). Outside fault bursts most calls are healthy; inside
one, most are faults of every kind the upstream can commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2, status_pb2

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc

HEALTHY = ("chunks={chunks},delay_ms={delay}",)
FAULTS = (
    "status=500",
    "status=503,times=1",
    "status=400",
    "rate_limit,times=1,retry_after_ms=50",
    "insufficient_quota",
    "too_large",
    "stall_after=3",
    "disconnect_after=3",
    "error_event_after=2",
    "malformed_after=2",
    "hang",
    "no_usage,chunks=8",
    "headers_delay_ms=400",
)
CHANNEL_OPTIONS = [
    # Restarts are part of the soak: come back quickly once chatgate listens again.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.use_local_subchannel_pool", 1),
]


@dataclass(slots=True)
class CallRecord:
    """What one caller saw of one call."""

    request_id: str
    scenario: str
    deadline_s: float
    cancel_after_s: float | None
    started_at: float  # wall clock, to compare with the timeline's events
    ended_at: float = 0.0
    code: str = ""
    reason: str = ""
    events: int = 0
    started: bool = False
    finished: bool = False
    outcome: str = ""


@dataclass
class Traffic:
    """``callers`` tasks sending calls until ``stop`` is set."""

    target: str
    callers: int
    seed: int = 0
    fault_share: float = 0.05
    burst_fault_share: float = 0.7
    cancel_share: float = 0.1
    large_prompt_share: float = 0.02
    in_burst: bool = False
    records: list[CallRecord] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        channels = [grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS) for _ in range(4)]
        try:
            stubs = [chat_pb2_grpc.ChatServiceStub(c) for c in channels]
            await asyncio.gather(
                *(
                    self._caller(stubs[i % len(stubs)], random.Random(self.seed * 1000 + i), stop)
                    for i in range(self.callers)
                )
            )
        finally:
            for channel in channels:
                await channel.close()

    async def _caller(
        self, stub: chat_pb2_grpc.ChatServiceAsyncStub, rng: random.Random, stop: asyncio.Event
    ) -> None:
        while not stop.is_set():
            record = await self._one_call(stub, rng)
            self.records.append(record)
            if record.code == "UNAVAILABLE" and not record.started:
                await asyncio.sleep(0.2)  # chatgate restarting or the breaker open: don't spin
            else:
                await asyncio.sleep(rng.uniform(0, 0.05))

    def _scenario(self, rng: random.Random) -> str:
        share = self.burst_fault_share if self.in_burst else self.fault_share
        if rng.random() < share:
            return rng.choice(FAULTS)
        return HEALTHY[0].format(chunks=rng.randint(3, 40), delay=rng.randint(5, 60))

    async def _one_call(self, stub: chat_pb2_grpc.ChatServiceAsyncStub, rng: random.Random) -> CallRecord:
        scenario = self._scenario(rng)
        prompt = "tell me about backpressure " * (
            8000 if rng.random() < self.large_prompt_share else rng.randint(1, 20)
        )
        record = CallRecord(
            request_id=uuid.uuid4().hex,
            scenario=scenario,
            deadline_s=rng.uniform(0.5, 8.0),
            cancel_after_s=rng.uniform(0.05, 1.5) if rng.random() < self.cancel_share else None,
            started_at=time.time(),
        )
        request = pb.CompleteRequest(
            model=f"gpt-4o-mini::{scenario}",
            user_id=f"soak-user-{rng.randint(1, 20)}",
            request_id=record.request_id,
            messages=[pb.Message(role=pb.ROLE_USER, text=prompt)],
            tags={"soak": "1"},
        )
        call = stub.Complete(request, timeout=record.deadline_s)
        canceller = None
        if record.cancel_after_s is not None:
            canceller = asyncio.get_running_loop().call_later(record.cancel_after_s, call.cancel)
        try:
            async for event in call:
                record.events += 1
                kind = event.WhichOneof("event")
                record.started |= kind == "started"
                if kind == "finished":
                    record.finished = True
                    record.outcome = pb.Outcome.Name(event.finished.outcome)
            record.code = "OK"
        except asyncio.CancelledError:
            record.code = "CANCELLED"
        except grpc.aio.AioRpcError as exc:
            record.code = exc.code().name
            record.reason = _reason(exc)
        finally:
            if canceller is not None:
                canceller.cancel()
        if record.code == "OK" and call.cancelled():
            record.code = "CANCELLED"
        record.ended_at = time.time()
        return record


def _reason(exc: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason in the rich status details, if any."""
    for key, value in exc.trailing_metadata() or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        with contextlib.suppress(Exception):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return str(info.reason)
    return ""
