"""A credential as the caller table holds it, and whether it may call now."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from chatgate_server.domain import Caller
from chatgate_server.errors import CredentialExpired, CredentialRevoked, Unauthenticated

OPERATOR_ROLE = "operator"
KNOWN_ROLES = frozenset({OPERATOR_ROLE})


@dataclass(frozen=True, slots=True)
class Credential:
    """One token or one client-certificate identity of one caller.

    Exactly one of ``token_sha256`` and ``cert_identity`` is set. ``expires_at`` is
    also how a rotation retires the old token: it is set to the end of the grace."""

    public_id: str
    tenant: str
    caller_name: str
    roles: frozenset[str]
    allowed_models: tuple[str, ...] | None
    token_sha256: bytes | None
    created_at: datetime
    cert_identity: str | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None

    def caller(self) -> Caller:
        return Caller(
            tenant=self.tenant,
            service=self.caller_name,
            roles=self.roles,
            credential_id=self.public_id,
            allowed_models=self.allowed_models,
        )

    def refusal(self, now: datetime) -> Unauthenticated | None:
        """Why this credential may not call at ``now``, or None if it may."""
        if self.revoked_at is not None and self.revoked_at <= now:
            return CredentialRevoked(f"credential {self.public_id} was revoked")
        if self.expires_at is not None and self.expires_at <= now:
            return CredentialExpired(f"credential {self.public_id} has expired")
        return None

    def status(self, now: datetime) -> str:
        """``active``, ``revoked`` or ``expired``, for listings."""
        refusal = self.refusal(now)
        if refusal is None:
            return "active"
        return "revoked" if isinstance(refusal, CredentialRevoked) else "expired"
