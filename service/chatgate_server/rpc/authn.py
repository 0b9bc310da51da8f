"""Who is calling: the credential a call presents, verified against the caller table.

A bearer token (``authorization: Bearer cgt_…`` metadata) is tried first; without one,
the identity of a verified client certificate (mTLS); without either the call is
refused with CREDENTIAL_MISSING. Verification is in memory (auth/table.py): no database
round trip per call.

Failed authentications are counted by reason (``chatgate.auth.failures``) and logged at
a bounded rate — one line per reason per :data:`LOG_EVERY_S` at most, with how many
were left out — so a client hammering with a bad token cannot flood the log. Neither
ever holds what was presented: only the reason, the message (which never repeats the
token) and the peer address.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from chatgate_server.auth.table import CallerTable
from chatgate_server.domain import ANONYMOUS_CALLER, Caller
from chatgate_server.errors import (
    CallersUnavailable,
    ChatgateError,
    CredentialInvalid,
    CredentialMissing,
    Unauthenticated,
)
from chatgate_server.rpc.tls import certificate_identity
from chatgate_server.telemetry import NO_TELEMETRY, Telemetry

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0
_BEARER = "bearer "


class Authenticator:
    """Resolves the caller of a call; ``table=None`` means CHATGATE_AUTH=off (anonymous)."""

    def __init__(
        self,
        table: CallerTable | None,
        *,
        certificates: bool = False,
        telemetry: Telemetry = NO_TELEMETRY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``certificates``: the server requires client certificates (CHATGATE_TLS_CLIENT_CA_FILE),
        so a verified certificate identity can prove the caller."""
        self._table = table
        self._certificates = certificates
        self._telemetry = telemetry
        self._clock = clock
        self._last_logged: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._warned_off = False

    @property
    def enabled(self) -> bool:
        return self._table is not None

    def resolve(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        """The caller this call proves; raises an ``Unauthenticated`` subclass (or
        CALLERS_UNAVAILABLE before the table's first load)."""
        table = self._table
        if table is None:
            return ANONYMOUS_CALLER
        try:
            return self._verify(table, context)
        except (Unauthenticated, CallersUnavailable) as exc:
            self._failed(exc, context)
            raise

    def _verify(self, table: CallerTable, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                text = value if isinstance(value, str) else ""
                if text[: len(_BEARER)].lower() != _BEARER:
                    raise CredentialInvalid("the authorization metadata must be 'Bearer <token>'")
                return table.verify_token(text[len(_BEARER) :].strip())
        if self._certificates:
            identity = certificate_identity(context.auth_context())
            if identity is not None:
                return table.verify_certificate(identity)
        raise CredentialMissing(
            "no credential: send 'authorization: Bearer <token>' metadata"
            + (" or a client certificate" if self._certificates else "")
        )

    def _failed(self, exc: ChatgateError, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        reason = exc.reason
        self._telemetry.auth_failures.add(1, {"chatgate.reason": reason})
        now = self._clock()
        last = self._last_logged.get(reason)
        if last is not None and now - last < LOG_EVERY_S:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        self._last_logged[reason] = now
        suppressed = self._suppressed.pop(reason, 0)
        log.warning(
            "authentication failed: %s (%s) from %s%s",
            reason,
            exc.message,
            context.peer(),
            f"; {suppressed} more {reason} in the last {LOG_EVERY_S:.0f}s not logged" if suppressed else "",
        )

    def health_checked(self) -> None:
        """Called on health checks: with authentication off, say so once more (start-up
        logs scroll away; the first probe's line is where someone looks)."""
        if self._table is None and not self._warned_off:
            self._warned_off = True
            log.warning(OFF_WARNING)


OFF_WARNING = (
    "CHATGATE_AUTH=off: every call is served as the anonymous caller, unauthenticated; for local work only"
)
