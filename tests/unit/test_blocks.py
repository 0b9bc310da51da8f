"""The block policy on an in-memory table with an injected clock: who is refused, with
what message, and when a block stops applying."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from chatgate_server.admission import AdmissionChain
from chatgate_server.domain import Caller, ChatMessage, CompletionRequest
from chatgate_server.errors import Blocked
from chatgate_server.limits.blocks import BlockPolicy, BlockTable
from chatgate_server.limits.blocks_records import Block, Scope, Source, Subject
from chatgate_server.rpc.status import to_status

NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)


def request(user: str = "u-1", tenant: str = "acme", service: str = "billing") -> CompletionRequest:
    return CompletionRequest(
        request_id="r-1",
        model="gpt-4o-mini",
        messages=(ChatMessage(role="user", content="hi"),),
        user_id=user,
        caller=Caller(tenant=tenant, service=service),
    )


def block(scope: Scope, text: str, *, until: datetime | None = None, reason: str = "runaway job") -> Block:
    return Block(
        Subject.parse(scope, text), Source.OPERATOR, reason, "alice", NOW - timedelta(hours=1), until
    )


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def policy(*blocks: Block, clock: Any = None) -> BlockPolicy:
    table = BlockTable(pool=None)  # type: ignore[arg-type] # never reloaded here
    table.replace(list(blocks))
    return BlockPolicy(table, clock or Clock())


async def test_a_blocked_user_is_refused_with_the_reason_and_the_end_time() -> None:
    p = policy(block(Scope.USER, "acme/u-42", until=NOW + timedelta(hours=1), reason="scraping, ticket 7"))
    with pytest.raises(Blocked) as refused:
        await p.admit(request("u-42"))
    assert refused.value.message == "user acme/u-42 is blocked until 2026-11-15T13:00:00Z: scraping, ticket 7"
    assert "alice" not in refused.value.message  # who set it is for the audit, not the caller
    status = to_status(refused.value)
    assert status.code.name == "PERMISSION_DENIED"
    assert refused.value.reason == "BLOCKED"


async def test_other_users_callers_and_tenants_pass() -> None:
    p = policy(block(Scope.USER, "acme/u-42"))
    await p.admit(request("u-43"))
    await p.admit(request("u-42", tenant="globex"))  # same user id, another tenant
    await p.admit(request("acme", tenant="acme"))  # a user named like the tenant


async def test_a_tenant_block_refuses_every_user_and_caller_of_the_tenant() -> None:
    p = policy(block(Scope.TENANT, "acme"))
    for user, service in (("u-1", "billing"), ("u-2", "search")):
        with pytest.raises(Blocked, match="tenant acme is blocked until unblocked: runaway job"):
            await p.admit(request(user, service=service))
    await p.admit(request(tenant="globex"))


async def test_a_caller_block_refuses_that_caller_only() -> None:
    p = policy(block(Scope.CALLER, "acme/billing"))
    with pytest.raises(Blocked, match="caller acme/billing"):
        await p.admit(request(service="billing"))
    await p.admit(request(service="search"))
    await p.admit(
        request(user="billing", service="search")
    )  # a user id equal to the caller's name is not the caller


async def test_a_block_stops_applying_at_its_end_without_an_unblock() -> None:
    clock = Clock()
    p = policy(block(Scope.USER, "acme/u-1", until=NOW + timedelta(minutes=5)), clock=clock)
    with pytest.raises(Blocked):
        await p.admit(request())
    clock.now = NOW + timedelta(minutes=5)
    await p.admit(request())


async def test_in_the_chain_a_block_refuses_after_the_preconditions_so_the_call_leaves_a_row() -> None:
    p = policy(block(Scope.USER, "acme/u-1"))
    chain = AdmissionChain(policies=(p,))
    admission = chain.start(request())
    with pytest.raises(Blocked):
        await chain.admit(admission)
    assert admission.recorded  # admission.py: a policy's refusal leaves a rejected row


async def test_a_table_that_never_loaded_blocks_nobody() -> None:
    table = BlockTable(pool=None)  # type: ignore[arg-type]
    assert not table.loaded
    await BlockPolicy(table).admit(request())


@pytest.mark.parametrize(
    ("scope", "text", "expected"),
    [
        ("tenant", "acme", Subject(Scope.TENANT, "acme")),
        ("caller", "acme/billing", Subject(Scope.CALLER, "acme", "billing")),
        ("user", "acme/team/u-42", Subject(Scope.USER, "acme", "team/u-42")),
    ],
)
def test_subjects_are_named_tenant_slash_name(scope: str, text: str, expected: Subject) -> None:
    assert Subject.parse(scope, text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    ("scope", "text"), [("tenant", ""), ("tenant", "a/b"), ("user", "acme"), ("caller", "/x")]
)
def test_malformed_subjects_are_refused(scope: str, text: str) -> None:
    with pytest.raises(ValueError, match=r"name|tenant"):
        Subject.parse(scope, text)
