"""The admission chain: which calls may start, and what each policy holds until they end.

A call passes an ordered list of policies before it reaches the upstream. Each policy's
:meth:`Policy.admit` either refuses (raises a :class:`~chatgate_server.errors.ChatgateError`
that says why: PERMISSION_DENIED, RESOURCE_EXHAUSTED, ALREADY_EXISTS…) or returns a
:class:`Ticket` — what it reserved for the call (a request id, a slice of a budget, a
concurrency slot). Every ticket a call was given is settled with the call's final
:class:`~chatgate_server.domain.UsageRecord` — completed, cancelled, cut, failed, or
refused by a later policy — or released when no record is written, in one place:
:meth:`Admission.settle` / :meth:`Admission.release`, called from the ``finally`` of
:meth:`~chatgate_server.completion.CompletionService.run`. So a policy never has to guess
how a call ended, and nothing it reserved can leak.

Which refusals leave a usage row (decided here, once):

- **Preconditions** come first. A call they refuse leaves *no* row, because the row is
  not the call's to write: the ledger is full (there is no room to record anything), or
  the caller-supplied request id belongs to another call (its row is that call's). A
  call cancelled before the preconditions pass leaves no row either.
- **Policies** come after. A call they refuse *does* leave a row — outcome ``rejected``,
  its status, no tokens, cost 0 with basis ``not_charged`` — so refusals show up in usage
  reports and abuse detection, per tenant, caller and user.
  Blocks (limits/blocks.py) are the first policy: a blocked tenant, caller or user is
  refused before any limit is reserved, and its refusals are visible in the usage.
- Refusals before admission — an unauthenticated call, a request that fails validation,
  the edge's concurrency and size limits — leave no row: they have no trustworthy
  subject or no well-formed request. They leave an access log line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from chatgate_server.domain import Allowance, CompletionRequest, UsageRecord


class Ticket:
    """What one policy holds for one admitted call. The defaults hold nothing.

    Subclasses override what they need; every method is called at most once per call,
    from the event loop, and must not block (start background work instead).
    """

    __slots__ = ()

    def amend(self, request: CompletionRequest) -> CompletionRequest:
        """The request the call goes on with (e.g. a completion-token cap added).
        Later policies and the upstream see the amended request."""
        return request

    @property
    def allowances(self) -> tuple[Allowance, ...]:
        """What the limits behind this ticket still allow, for the call's first event."""
        return ()

    def settle(self, record: UsageRecord) -> UsageRecord:
        """The call ended with ``record``; return the record to write (a policy may add
        what it knows, e.g. the request's fingerprint)."""
        return record

    def release(self) -> None:
        """The call ended without a record (refused by a precondition, or cancelled
        before it was recorded): give back whatever was reserved."""


NO_TICKET = Ticket()
"""The ticket of a policy that reserves nothing."""


class Policy(Protocol):
    """One admission rule."""

    async def admit(self, request: CompletionRequest) -> Ticket:
        """Return a ticket, or raise a ChatgateError naming why ``request`` may not start."""
        ...


@dataclass(slots=True)
class Admission:
    """One call's passage through the chain: the tickets it holds so far."""

    request: CompletionRequest
    tickets: list[Ticket] = field(default_factory=list)
    recorded: bool = False
    """True once the preconditions passed: from then on, however the call ends, it
    leaves a usage row."""

    def allowances(self) -> tuple[Allowance, ...]:
        """Every ticket's allowances, in the order the tickets were taken."""
        out: tuple[Allowance, ...] = ()
        for ticket in self.tickets:
            mine = ticket.allowances
            if mine:  # usually one ticket has any: its tuple is the answer, not a copy
                out = out + mine if out else mine
        return out

    def settle(self, record: UsageRecord) -> UsageRecord:
        """Settle every ticket with the call's final record, in the order taken."""
        for ticket in self.tickets:
            record = ticket.settle(record)
        return record

    def release(self) -> None:
        """Release every ticket: the call ends without a record."""
        for ticket in reversed(self.tickets):
            ticket.release()


class AdmissionChain:
    """The ordered preconditions and policies every call passes (see the module docstring)."""

    def __init__(self, preconditions: Sequence[Policy] = (), policies: Sequence[Policy] = ()) -> None:
        self._preconditions = tuple(preconditions)
        self._policies = tuple(policies)

    def start(self, request: CompletionRequest) -> Admission:
        """A call's admission, before any policy ran. With no preconditions the call's
        row is its own from the start."""
        return Admission(request, recorded=not self._preconditions)

    async def admit(self, admission: Admission) -> CompletionRequest:
        """Run every policy in order; return the (amended) request.

        Raises the first refusal. The tickets taken before it stay on ``admission``, to
        be settled or released by the caller with everything else.
        """
        for policy in self._preconditions:
            await self._take(admission, policy)
        admission.recorded = True
        for policy in self._policies:
            await self._take(admission, policy)
        return admission.request

    @staticmethod
    async def _take(admission: Admission, policy: Policy) -> None:
        ticket = await policy.admit(admission.request)
        admission.tickets.append(ticket)
        admission.request = ticket.amend(admission.request)


NO_ADMISSION = AdmissionChain()
"""Admits every call and holds nothing (tests, benches)."""
