"""Every credential in memory, so that authenticating a call never waits on Postgres.

The table reloads when the database's caller version changes: one indexed read of a
one-row table every ``poll_s`` (1 s by default), so a revocation or a new caller takes
effect on every process of every replica within about a second plus one reload. Why
polling and not LISTEN/NOTIFY alone: a notification is lost while the listening
connection is down and never arrives through a transaction-mode pooler such as
PgBouncer; the version read is cheap and always right.

While Postgres is away the table keeps what it last loaded (nobody can revoke then
either). A table that has never loaded refuses every call: authentication fails
closed, never open.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from chatgate_server.auth import tokens
from chatgate_server.auth.records import Credential
from chatgate_server.auth.store import CallerStore
from chatgate_server.domain import Caller
from chatgate_server.errors import CallersUnavailable, CredentialInvalid
from chatgate_server.table_poll import TablePoller

log = logging.getLogger(__name__)


# The name the table's callers knew first.
CallerTableNotLoaded = CallersUnavailable


class CallerTable:
    """Verifies tokens against an in-memory copy of the credentials."""

    def __init__(
        self,
        store: CallerStore,
        *,
        poll_s: float = 1.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._clock = clock
        self._by_id: dict[str, Credential] | None = None
        self._by_identity: dict[str, Credential] = {}
        self._callers: dict[str, Caller] = {}
        self._version: int | None = None
        self._poller = TablePoller(
            self.refresh,
            what="caller table",
            unloaded="calls are refused (CALLERS_UNAVAILABLE) until it loads",
            poll_s=poll_s,
        )
        self._loaded = asyncio.Event()

    def verify_token(self, text: str) -> Caller:
        """The caller a bearer token proves; raises an ``Unauthenticated`` subclass."""
        if self._by_id is None:
            raise CallersUnavailable("the caller table is not loaded yet", retry_after=1.0)
        try:
            token = tokens.parse(text)
        except tokens.MalformedToken as exc:
            raise CredentialInvalid(str(exc)) from None
        credential = self._by_id.get(token.public_id)
        if (
            credential is None
            or credential.token_sha256 is None
            or not tokens.matches(token.secret, credential.token_sha256)
        ):
            raise CredentialInvalid("unknown credential")
        refusal = credential.refusal(self._clock())
        if refusal is not None:
            raise refusal
        return self._callers[credential.public_id]

    def verify_certificate(self, identity: str) -> Caller:
        """The caller a verified client certificate's identity maps to."""
        if self._by_id is None:
            raise CallersUnavailable("the caller table is not loaded yet", retry_after=1.0)
        credential = self._by_identity.get(identity)
        if credential is None:
            raise CredentialInvalid("the client certificate is not mapped to a caller")
        refusal = credential.refusal(self._clock())
        if refusal is not None:
            raise refusal
        return self._callers[credential.public_id]

    @property
    def loaded(self) -> bool:
        return self._by_id is not None

    async def wait_loaded(self) -> None:
        """Return once the table has loaded (at once if it has)."""
        await self._loaded.wait()

    async def refresh(self) -> bool:
        """Reload if the database's version moved; True if it reloaded."""
        version = await self._store.version()
        if version == self._version and self._by_id is not None:
            return False
        credentials = await self._store.credentials()
        # Callers are immutable: made once per load, not once per call.
        self._callers = {c.public_id: c.caller() for c in credentials}
        self._by_id = {c.public_id: c for c in credentials}
        self._by_identity = {c.cert_identity: c for c in credentials if c.cert_identity is not None}
        self._version = version
        self._loaded.set()
        return True

    async def start(self, load_timeout_s: float | None = None) -> bool:
        """Load once (waiting at most ``load_timeout_s``; a failure is logged and the poll
        retries), then keep refreshing (table_poll.py). True if the table is loaded."""
        await self._poller.start(load_timeout_s)
        return self.loaded

    async def stop(self) -> None:
        await self._poller.stop()
