"""Stopping the background tasks a component started (pollers, flushers, watchers)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def stop_tasks(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel every task given (None stands for none) and wait until each has stopped,
    so nothing it does outlives the component that stops it."""
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    for task in running:
        with contextlib.suppress(asyncio.CancelledError):
            await task
