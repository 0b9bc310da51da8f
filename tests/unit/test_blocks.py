"""The block policy on an in-memory table with an injected clock: who is refused, with
what message, and when a block stops applying."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from chatgate_server.admission import AdmissionChain
from chatgate_server.domain import Caller, ChatMessage, CompletionRequest
from chatgate_server.errors import Blocked
from chatgate_server.limits import blocks_store
from chatgate_server.limits.blocks import BlockPolicy, BlockTable
from chatgate_server.limits.blocks_records import Block, Scope, Source, Subject
from chatgate_server.rpc.status import to_status

# Where the block table logs: its own module, and the poller it shares (table_poll.py).
TABLE_LOGS = ("chatgate_server.limits.blocks", "chatgate_server.table_poll")

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


async def test_the_default_clock_is_utc_and_ends_blocks_on_time() -> None:
    table = BlockTable(pool=None)  # type: ignore[arg-type]
    table.replace(
        [
            Block(Subject.parse(Scope.USER, "acme/u-1"), Source.OPERATOR, "", "alice", NOW, None),
            Block(Subject.parse(Scope.USER, "acme/u-2"), Source.OPERATOR, "", "alice", NOW, NOW),  # ended
        ]
    )
    with pytest.raises(Blocked):
        await BlockPolicy(table).admit(request("u-1"))
    await BlockPolicy(table).admit(request("u-2"))


async def test_a_block_without_a_reason_says_whom_and_until_when_only() -> None:
    p = policy(block(Scope.TENANT, "acme", reason=""))
    with pytest.raises(Blocked) as refused:
        await p.admit(request())
    assert refused.value.message == "tenant acme is blocked until unblocked"


class FakeStore:
    """blocks_store's two reads, scripted: each poll takes the next version (an exception
    is raised); ``polled`` is set once the script has run out."""

    def __init__(self, pool: object, versions: list[int | Exception], blocks: dict[int, list[Block]]) -> None:
        self.pool = pool
        self.versions = versions
        self.blocks = blocks
        self.reads = 0
        self.loads = 0
        self.current = 0
        self.polled = asyncio.Event()

    async def version(self, pool: object) -> int:
        assert pool is self.pool
        self.reads += 1
        if not self.versions:
            self.polled.set()
            return self.current
        step = self.versions.pop(0)
        if isinstance(step, Exception):
            raise step
        self.current = step
        return step

    async def active_blocks(self, pool: object) -> list[Block]:
        assert pool is self.pool
        self.loads += 1
        return self.blocks.get(self.current, [])


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeStore]:
    def make(versions: list[int | Exception], blocks: dict[int, list[Block]] | None = None) -> FakeStore:
        fake = FakeStore(object(), versions, blocks or {})
        monkeypatch.setattr(blocks_store, "version", fake.version)
        monkeypatch.setattr(blocks_store, "active_blocks", fake.active_blocks)
        return fake

    return make


async def test_a_reload_happens_when_the_version_moves_and_only_then(store: Callable[..., FakeStore]) -> None:
    fake = store([1, 1, 2, 2], {1: [block(Scope.USER, "acme/u-1")], 2: []})
    table = BlockTable(fake.pool)  # type: ignore[arg-type]
    assert await table.refresh() and table.loaded
    assert table.blocking("acme", "billing", "u-1", NOW) is not None
    assert not await table.refresh()  # same version: nothing read
    assert await table.refresh()  # moved: the block was lifted
    assert table.blocking("acme", "billing", "u-1", NOW) is None
    assert not await table.refresh()
    assert fake.loads == 2


async def test_the_poll_keeps_the_table_fresh_and_logs_each_outage_once(
    store: Callable[..., FakeStore], caplog: pytest.LogCaptureFixture
) -> None:
    down = ConnectionError("postgres away")
    fake = store([1, down, down, 2, down], {2: [block(Scope.USER, "acme/u-1")]})
    table = BlockTable(fake.pool, poll_s=0)  # type: ignore[arg-type]
    await table.start()
    await asyncio.wait_for(fake.polled.wait(), 5)
    await table.stop()
    assert table.blocking("acme", "billing", "u-1", NOW) is not None  # version 2 loaded
    warned = [r.getMessage() for r in caplog.records if r.name in TABLE_LOGS]
    assert warned == ["cannot refresh the block table: ConnectionError"] * 2  # two outages
    reads = fake.reads
    for _ in range(5):
        await asyncio.sleep(0)
    assert fake.reads == reads  # stopped: no more polls
    await table.stop()  # twice is harmless


async def test_the_poll_waits_its_interval_a_second_by_default(
    store: Callable[..., FakeStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = store([1, 1])
    waits: list[float] = []
    sleep = asyncio.sleep

    async def recorded(delay: float) -> None:
        waits.append(delay)
        await sleep(0)

    monkeypatch.setattr(asyncio, "sleep", recorded)
    table = BlockTable(fake.pool)  # type: ignore[arg-type]
    await table.start()
    await asyncio.wait_for(fake.polled.wait(), 5)
    await table.stop()
    assert waits and set(waits) == {1.0}


async def test_a_first_load_that_fails_or_hangs_blocks_nobody_and_is_logged(
    store: Callable[..., FakeStore], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = store([ConnectionError("away")])
    table = BlockTable(fake.pool, poll_s=3600)  # type: ignore[arg-type]
    await table.start()
    assert not table.loaded
    await BlockPolicy(table).admit(request())
    await table.stop()
    assert [r.getMessage() for r in caplog.records if r.name in TABLE_LOGS] == [
        "cannot load the block table (ConnectionError); no blocks apply until it loads"
    ]

    never = asyncio.Event()

    async def hangs(pool: object) -> int:
        await never.wait()
        return 1

    monkeypatch.setattr(blocks_store, "version", hangs)
    table = BlockTable(fake.pool, poll_s=3600)  # type: ignore[arg-type]
    await asyncio.wait_for(table.start(load_timeout_s=0.01), 5)
    assert not table.loaded
    await table.stop()


async def test_stopping_a_table_that_never_started_is_harmless() -> None:
    await BlockTable(pool=None).stop()  # type: ignore[arg-type]
