"""Blocks in memory, and the admission policy that refuses a blocked tenant, caller or user.

Checking a call costs three dictionary lookups, never a database round trip: every
process keeps the blocks in force in memory and reloads them when the database's block
version moves (one read of a one-row table every ``poll_s``, 1 s by default), so a new
block refuses calls on every process of every replica within about a second plus one
reload — well inside the 5 s promised. Polling rather than LISTEN/NOTIFY for the reason
auth/table.py gives: a notification is lost while its connection is down and never
passes a transaction-mode pooler.

A block ends by itself at its ``expires_at``: the check compares it with the clock, so
no one has to unblock and no reload is needed. While Postgres is away the table keeps
what it last loaded (and keeps ending blocks on time). A table that has never loaded
blocks nobody: a block is a restriction an operator added, and failing closed here
would refuse every call whenever Postgres was away at start-up.

The policy runs first among the admission policies (after the preconditions), so a
blocked call leaves a ``rejected`` usage row (admission.py) — a blocked user who keeps
calling shows up in usage reports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from chatgate_server.admission import NO_TICKET, Ticket
from chatgate_server.domain import CompletionRequest
from chatgate_server.errors import Blocked
from chatgate_server.limits import blocks_store
from chatgate_server.limits.blocks_records import Block, Scope
from chatgate_server.table_poll import TablePoller

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class BlockTable:
    """The blocks in force, in memory, kept fresh by a poll of the block version."""

    def __init__(self, pool: blocks_store.Pool, *, poll_s: float = 1.0) -> None:
        self._pool = pool
        self._blocks: dict[tuple[str, str, str], Block] = {}
        self._version: int | None = None
        self._poller = TablePoller(
            self.refresh, what="block table", unloaded="no blocks apply until it loads", poll_s=poll_s
        )

    @property
    def loaded(self) -> bool:
        return self._version is not None

    def replace(self, blocks: list[Block]) -> None:
        """Use exactly these blocks (a reload; tests)."""
        self._blocks = {b.subject.key: b for b in blocks}

    def blocking(self, tenant: str, caller: str, user_id: str, now: datetime) -> Block | None:
        """The block that refuses a call of ``user_id`` through ``caller`` of ``tenant``
        at ``now``, if any: the tenant's first, then the caller's, then the user's."""
        blocks = self._blocks
        if not blocks:
            return None
        for key in (
            (Scope.TENANT.value, tenant, ""),
            (Scope.CALLER.value, tenant, caller),
            (Scope.USER.value, tenant, user_id),
        ):
            found = blocks.get(key)
            if found is not None and found.applies(now):
                return found
        return None

    async def refresh(self) -> bool:
        """Reload if the database's version moved; True if it reloaded."""
        version = await blocks_store.version(self._pool)
        if version == self._version:
            return False
        self.replace(await blocks_store.active_blocks(self._pool))
        self._version = version
        return True

    async def start(self, load_timeout_s: float | None = None) -> None:
        """Load once (waiting at most ``load_timeout_s``; a failure is logged and the poll
        retries), then keep refreshing (table_poll.py)."""
        await self._poller.start(load_timeout_s)

    async def stop(self) -> None:
        await self._poller.stop()


class BlockPolicy:
    """Refuses calls of a blocked tenant, caller or user: PERMISSION_DENIED, reason
    BLOCKED, with the recorded reason and the end of the block in the message."""

    def __init__(self, table: Any, clock: Clock = _utc_now) -> None:
        """``table`` answers :meth:`BlockTable.blocking`."""
        self._table = table
        self._clock = clock

    async def admit(self, request: CompletionRequest) -> Ticket:
        caller = request.caller
        found = self._table.blocking(caller.tenant, caller.service, request.user_id, self._clock())
        if found is not None:
            raise Blocked(refusal_message(found))
        return NO_TICKET


def refusal_message(block: Block) -> str:
    """What a refused caller reads: whom, until when, why (never who set it)."""
    why = f": {block.reason}" if block.reason else ""
    return f"{block.subject.label} is blocked {block.until}{why}"
