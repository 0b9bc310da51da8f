"""Load an in-memory copy of a Postgres table once, then keep it fresh by polling.

The caller table (auth/), the block table and the limit table (limits/) share this life:
one bounded first load before serving (a failure is logged and serving goes on), then a
re-read every ``poll_s`` — each re-read is one version-row query unless the table
changed — keeping the last good copy through an outage, logged once per outage rather
than once per poll. Why polling and not LISTEN/NOTIFY: auth/table.py says.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from chatgate_server.background import stop_tasks

log = logging.getLogger(__name__)


class TablePoller:
    """Drives ``refresh`` for one table: :meth:`start` loads and starts polling, :meth:`stop` ends it."""

    def __init__(
        self,
        refresh: Callable[[], Awaitable[object]],
        *,
        what: str,
        unloaded: str,
        poll_s: float,
    ) -> None:
        """``what``: the table's name in logs ("caller table"). ``unloaded``: what it
        means for calls while the first load has not happened ("calls are refused…")."""
        self._refresh = refresh
        self._what = what
        self._unloaded = unloaded
        self._poll_s = poll_s
        self._task: asyncio.Task[None] | None = None

    async def start(self, load_timeout_s: float | None) -> None:
        """Load once, waiting at most ``load_timeout_s``, then poll in the background."""
        try:
            async with asyncio.timeout(load_timeout_s):
                await self._refresh()
        except Exception as exc:  # noqa: BLE001 - not loaded yet: the poll retries
            log.warning("cannot load the %s (%s); %s", self._what, type(exc).__name__, self._unloaded)
        self._task = asyncio.create_task(self._poll(), name=self._what.replace(" ", "-"))

    async def stop(self) -> None:
        await stop_tasks(self._task)
        self._task = None

    async def _poll(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                await self._refresh()
            except Exception as exc:  # noqa: BLE001 - any failure: keep the last table, retry
                if not failing:  # once per outage, not once per poll
                    log.warning("cannot refresh the %s: %s", self._what, type(exc).__name__)
                failing = True
            else:
                failing = False
