"""stop_tasks: every task given is cancelled and has stopped when it returns."""

from __future__ import annotations

import asyncio

from chatgate_server.background import stop_tasks


async def test_every_task_is_cancelled_and_done_when_stop_returns() -> None:
    cleaned: list[str] = []

    async def worker(name: str) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0)  # its own clean-up takes a turn of the loop
            cleaned.append(name)

    tasks = [asyncio.create_task(worker(n)) for n in ("a", "b")]
    await asyncio.sleep(0)
    await stop_tasks(tasks[0], None, tasks[1])
    assert all(t.cancelled() for t in tasks)
    assert cleaned == ["a", "b"]
    await stop_tasks()  # nothing to stop
