"""What a block is: a subject (tenant, caller or end user), why, by whom, until when."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

# The longest names and reason the blocks table holds (migration 0011).
MAX_TENANT = 128
MAX_NAME = 256
MAX_REASON = 1024


class Scope(enum.StrEnum):
    """Whom a block (or a finding) applies to; the values are the words operators type."""

    TENANT = "tenant"
    CALLER = "caller"  # a calling service of a tenant
    USER = "user"  # an end user within a tenant


class Source(enum.StrEnum):
    """Who set a block: an operator (``chatgate block``) or the abuse detector."""

    OPERATOR = "operator"
    DETECTOR = "detector"


@dataclass(frozen=True, slots=True)
class Subject:
    """A tenant (``name`` ''), a caller of a tenant (its service name) or a user of a
    tenant (the user id)."""

    scope: Scope
    tenant: str
    name: str = ""

    @classmethod
    def parse(cls, scope: Scope | str, text: str) -> Subject:
        """``acme`` for a tenant; ``acme/billing`` for a caller, ``acme/u-42`` for a user
        (the tenant is what comes before the first slash; a user id may hold more)."""
        scope = Scope(scope)
        text = text.strip()
        if scope is Scope.TENANT:
            if not text or "/" in text:
                raise ValueError(f"{text[:MAX_TENANT]!r}: a tenant is one name, such as acme")
            tenant, name = text, ""
        else:
            tenant, sep, name = text.partition("/")
            if not sep or not tenant or not name:
                example = "acme/billing" if scope is Scope.CALLER else "acme/u-42"
                raise ValueError(
                    f"{text[:MAX_TENANT]!r}: name the {scope.value} as <tenant>/<{scope.value}>,"
                    f" e.g. {example}"
                )
        if len(tenant) > MAX_TENANT or len(name) > MAX_NAME:
            # The table's bounds (migration 0011): a usage error, not Postgres's refusal.
            raise ValueError(f"a tenant is at most {MAX_TENANT} characters, a name {MAX_NAME}")
        return cls(scope, tenant, name)

    def __str__(self) -> str:
        return self.tenant if self.scope is Scope.TENANT else f"{self.tenant}/{self.name}"

    @property
    def label(self) -> str:
        """``user acme/u-42``: how messages name it."""
        return f"{self.scope.value} {self}"

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.scope.value, self.tenant, self.name)


@dataclass(frozen=True, slots=True)
class Block:
    """One subject's block, as stored."""

    subject: Subject
    source: Source
    reason: str
    blocked_by: str
    blocked_at: datetime
    expires_at: datetime | None  # None: until unblocked

    def applies(self, now: datetime) -> bool:
        return self.expires_at is None or now < self.expires_at

    @property
    def until(self) -> str:
        """When it ends, in words for a message."""
        if self.expires_at is None:
            return "until unblocked"
        return f"until {self.expires_at.strftime('%Y-%m-%dT%H:%M:%SZ')}"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One line of the block audit: a block or an unblock."""

    at: datetime
    action: str  # "block" | "unblock"
    subject: Subject
    source: Source
    actor: str
    reason: str
    expires_at: datetime | None
