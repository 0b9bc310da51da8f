"""Estimating the tokens of a cut call must not stall the event loop (issue 13, item 4).

A call cut before the upstream reported usage is billed from a token estimate. With
a prompt of megabytes, tokenizing all of it took ~0.5 s of the event loop per call
here (1.6 s on the loaded machine of the report), during which no other stream, health
check or ledger write moved. A ticker task on the same loop measures that stall while
four such calls are cut at once.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any

import grpc
import psycopg

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.app import App
from chatgate_server.usage.tokens import SAMPLE_CHARS
from tests.integration.test_cancellation import rows_for

WORDS = ("river", "stone", "über", "数据", "lantern", "1987", "quietly", "fox", "the", "of")
# Bigger than anything tiktoken does in a few ms, under the default 4 MiB request limit.
PROMPT_CHARS = 3_800_000
# Before the fix one cut alone stalled the loop ~0.5 s on an idle 2-core machine; after
# it, four together take ~0.05 s. The bound leaves room for a loaded machine.
MAX_STALL_S = 0.3


def big_prompt(seed: int) -> str:
    rng = random.Random(seed)
    words: list[str] = []
    size = 0
    while size < PROMPT_CHARS:
        word = rng.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


class Ticker:
    """Wakes every 5 ms and records the longest time the loop kept it waiting."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._last = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def _tick(self) -> None:
        now = time.monotonic()
        self.worst = max(self.worst, now - self._last - 0.005)
        self._last = now

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.005)
            self._tick()

    def __enter__(self) -> Ticker:
        self._last = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self._tick()  # a stall that outlasted the window counts too


async def test_cutting_calls_with_huge_prompts_does_not_stall_the_loop(
    app: App, db: psycopg.Connection[Any]
) -> None:
    requests = [
        pb.CompleteRequest(
            # gpt-4.1: its 1M-token window takes the ~4 MB prompts (the simulator, like
            # OpenAI, refuses a prompt over the model's window).
            model="gpt-4.1::stall_after=1,chunks=9",
            user_id="big",
            request_id=uuid.uuid4().hex,
            messages=[pb.Message(role=pb.ROLE_USER, text=big_prompt(seed))],
        )
        for seed in range(4)
    ]
    options = [("grpc.max_send_message_length", 8 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=options) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        calls = [stub.Complete(req, timeout=60) for req in requests]
        for call in calls:  # started, then the one content chunk: each call is mid-stream
            for _ in range(2):
                assert isinstance(await call.read(), pb.CompleteResponse)
        assert app.service is not None and app.service.active_calls == 4
        with Ticker() as ticker:
            for call in calls:
                call.cancel()
            # Until every cut call has estimated and billed (the service has no event for it).
            while app.service.active_calls:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
    print(f"worst event-loop stall while 4 calls were cut: {ticker.worst * 1000:.1f} ms")
    assert ticker.worst < MAX_STALL_S

    # Billed from an extrapolated estimate that is still close: ~1 token per word here.
    row = (await rows_for(app, db, requests[0].request_id))[0]
    assert row["outcome"] == "cancelled" and row["usage_source"] == "estimated"
    words = len(requests[0].messages[0].text.split())
    assert 0.8 * words < row["input_tokens"] < 2.5 * words
    assert SAMPLE_CHARS < PROMPT_CHARS
