"""Three chatgate replicas sharing one Postgres, a client balancing over them, and
replicas leaving under load — the promises of one process must hold for three.

- One replica gets SIGTERM and another SIGKILL (then restarts with the same spool):
  every call that got its ``finished`` event has exactly one usage row; the SIGTERMed
  replica's streams end with their final event; calls that reach a dying replica
  before any event are retried by the client's service config and succeed; rows the
  killed replica held in its spool (its Postgres was away) are replayed on restart.
  Once straight to Postgres, once through PgBouncer in transaction mode.
- ``CHATGATE_MAX_CONNECTION_AGE_SECONDS`` moves a long-lived client's calls across
  replicas behind a connection-level balancer (a Kubernetes ClusterIP Service), and
  cuts no stream.

Which replica served a call is read from its access lines (JSON, with the request id).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
import pytest

from chatgate.client import AsyncClient, ChatgateError, Finished, Outcome, Started, build_request
from chatgate_server.simulator import Simulator
from tests.databases import throwaway_database
from tests.integration.pgbouncer import pgbouncer
from tests.integration.pgproxy import running_proxy
from tests.integration.replicas import Replica, TcpBalancer

# About 0.8 s per call, a third of it before the first event (the upstream is slow to
# answer).
STREAM = "gpt-4o-mini::headers_delay_ms=300,chunks=8,delay_ms=40"
# Calls sent just before a replica is killed, still waiting for the upstream's answer
# (no event yet) when it dies.
PROBE = "gpt-4o-mini::headers_delay_ms=1500,chunks=3"
PROBES = 6


@dataclass
class Call:
    request_id: str | None = None
    events: int = 0
    outcome: Outcome | None = None
    error: ChatgateError | None = None


async def one_call(client: AsyncClient, model: str = STREAM, request_id: str = "") -> Call:
    call = Call()
    request = build_request(model, "hi", user_id="u-replicas", request_id=request_id)
    try:
        async for event in client.complete(request):
            call.events += 1
            if isinstance(event, Started):
                call.request_id = event.request_id
            elif isinstance(event, Finished):
                call.outcome = event.outcome
    except ChatgateError as exc:
        call.error = exc
    return call


@dataclass
class Load:
    """Tasks each making one call after another until stopped."""

    client: AsyncClient
    calls: list[Call] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self, tasks: int) -> None:
        self._tasks = [asyncio.create_task(self._run()) for _ in range(tasks)]

    async def _run(self) -> None:
        await asyncio.sleep(random.uniform(0, 0.4))  # tasks out of step with each other
        while not self._stop.is_set():
            self.calls.append(await one_call(self.client))

    async def stop(self) -> list[Call]:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), timeout=30)
        return self.calls


def access_lines(replica: Replica, text: str | None = None) -> list[dict[str, object]]:
    """The replica's access lines (one per call), in order."""
    lines = []
    for raw in (replica.log_text() if text is None else text).splitlines():
        with contextlib.suppress(ValueError):
            line = json.loads(raw)
            if line.get("logger") == "chatgate.access" and line.get("method", "").endswith("/Complete"):
                lines.append(line)
    return lines


def served_ids(replica: Replica, text: str | None = None) -> set[str]:
    """Calls the replica served (its refusals, outcome ``rejected``, are not counted)."""
    return {
        str(line["request_id"])
        for line in access_lines(replica, text)
        if line.get("outcome") not in (None, "rejected")
    }


async def logged(replica: Replica, text: str) -> None:
    deadline = time.monotonic() + 10
    while text not in replica.log_text():
        assert time.monotonic() < deadline, f"{replica.name} never logged {text!r}"
        await asyncio.sleep(0.02)


def rows_per_id(database_url: str, ids: set[str]) -> dict[str, int]:
    with psycopg.connect(database_url) as conn:
        found = conn.execute(
            "SELECT request_id, count(*) FROM usage_records WHERE request_id = ANY(%s) GROUP BY request_id",
            (list(ids),),
        ).fetchall()
    return {str(request_id): int(n) for request_id, n in found}


def probe_requests(simulator: Simulator) -> list[object]:
    return [r for r in simulator.requests if r.spec.headers_delay_ms == 1500]


async def upstream_requests(simulator: Simulator, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(probe_requests(simulator)) < n:
        assert time.monotonic() < deadline, "the probe calls did not reach the upstream"
        await asyncio.sleep(0.02)


@dataclass(frozen=True)
class Database:
    direct: str
    """For the test's checks."""
    served: str
    """What the replicas use: the same database, directly or through PgBouncer."""
    pooled: bool


@pytest.fixture(params=["direct", "pgbouncer"])
def database(request: pytest.FixtureRequest, database_url: str) -> Iterator[Database]:
    with throwaway_database(database_url, "chatgate_replicas", migrate=True) as direct:
        if request.param == "direct":
            yield Database(direct, direct, pooled=False)
        else:
            with pgbouncer(direct) as pooled:
                yield Database(direct, pooled, pooled=True)


def replica_env(database_url: str, simulator: Simulator, pooled: bool, **extra: str) -> dict[str, str]:
    return {
        "OPENAI_BASE_URL": simulator.base_url,
        "DATABASE_URL": database_url,
        "CHATGATE_DATABASE_TRANSACTION_POOLING": "true" if pooled else "false",
        **extra,
    }


@contextlib.asynccontextmanager
async def replicas(*members: Replica) -> AsyncIterator[tuple[Replica, ...]]:
    try:
        await asyncio.gather(*(r.start() for r in members))
        yield members
    finally:
        for r in members:
            await r.stop()


def balanced_target(*members: Replica) -> str:
    """One gRPC target naming every replica: the client's round_robin spreads over them
    (as over the addresses a headless Service's DNS name resolves to)."""
    return "ipv4:" + ",".join(r.target for r in members)


async def test_replicas_leave_under_load_and_no_call_or_row_is_lost(
    database: Database, simulator: Simulator, tmp_path: Path
) -> None:
    async with running_proxy(database.served) as proxy:
        a = Replica("a", tmp_path, replica_env(database.served, simulator, database.pooled))
        b = Replica("b", tmp_path, replica_env(database.served, simulator, database.pooled))
        # The one to be killed reaches Postgres through a proxy the test cuts, so that it
        # holds rows in its spool when it dies.
        c = Replica("c", tmp_path, replica_env(proxy.url_for(database.served), simulator, database.pooled))
        async with replicas(a, b, c), AsyncClient(balanced_target(a, b, c), timeout=20) as client:
            load = Load(client)
            load.start(tasks=8)
            await asyncio.sleep(1.5)

            b.signal(signal.SIGTERM)  # drains: its streams finish, new calls are refused
            await logged(b, "shutting down")
            # Calls made now must not reach b, or be retried elsewhere if they do.
            during_drain = await asyncio.gather(*(one_call(client) for _ in range(6)))
            assert await b.exit_code() == 0, b.log_tail()
            await asyncio.sleep(0.5)

            proxy.cut()  # c's Postgres is away: its usage rows go to its spool
            await asyncio.sleep(1.5)
            # With ids of the caller's: the retry carries the same one.
            probe_ids = {f"probe-{uuid.uuid4().hex}" for _ in range(PROBES)}
            probes = [asyncio.create_task(one_call(client, PROBE, i)) for i in probe_ids]
            await upstream_requests(simulator, PROBES)  # half of them on c, none answered yet
            c.signal(signal.SIGKILL)
            await c.exit_code()
            first_life = c.log_text()
            spooled = served_ids(c, first_life) - set(rows_per_id(database.direct, served_ids(c, first_life)))
            proxy.restore()
            await c.start()  # same port, same spool
            await asyncio.sleep(1.5)

            calls = await load.stop()
            probed = await asyncio.gather(*probes)
            for r in (a, c):
                r.signal(signal.SIGTERM)
            assert [await a.exit_code(), await c.exit_code()] == [0, 0], a.log_tail() + c.log_tail()

    finished = {c.request_id for c in calls if c.outcome is not None and c.request_id}
    # round_robin: every replica had its share while it was up.
    assert all(served_ids(r) & finished for r in (a, b, c))
    failed = [c for c in calls if c.error is not None]
    # Every call either finished, or was cut mid-stream by the SIGKILL: its events had
    # arrived, so nobody may retry it, and the killed process never wrote its row (what a
    # kill -9 loses: the calls it was running).
    assert all(c.outcome is Outcome.COMPLETED for c in calls if c.error is None), calls
    for call in failed:
        assert call.error is not None
        assert (call.error.code, call.events > 0) == (grpc.StatusCode.UNAVAILABLE, True), call
        assert call.request_id not in served_ids(a) | served_ids(b)
    # No call failed before its first event: those reaching b while it drained, or c as
    # it died, were retried by the client's service config and answered elsewhere.
    assert not [c for c in failed if c.events == 0]

    # The probes c held when it died, before their first event, were retried by the
    # client (one more upstream request each) and answered by a.
    assert [(p.outcome, p.error) for p in probed] == [(Outcome.COMPLETED, None)] * PROBES
    assert len(probe_requests(simulator)) > PROBES
    assert rows_per_id(database.direct, probe_ids) == dict.fromkeys(probe_ids, 1)

    # b was serving streams when SIGTERM came; each ended with its final event, on the
    # client's side and in b's own lines (none cut by the end of the grace period).
    after = b.log_text().partition("shutting down")[2]
    drained = served_ids(b, after)
    assert drained, "b had no stream running when SIGTERM came: the scenario did not happen"
    assert drained <= finished
    # Calls made while b drained went elsewhere (its GOAWAY took it out of the client's
    # rotation; a call that still reached it was refused, or dropped unrun by gRPC's core
    # with CANCELLED, then retried by the client).
    assert [(c.outcome, c.error) for c in during_drain] == [(Outcome.COMPLETED, None)] * len(during_drain)
    refused = [line for line in access_lines(b) if line.get("outcome") == "rejected"]
    assert {line["reason"] for line in refused} <= {"SHUTTING_DOWN"}
    assert {line.get("outcome") for line in access_lines(b)} <= {"completed", "rejected"}

    # c's spool held rows when it died, and its restart replayed them.
    assert spooled, "c held no rows in its spool when killed: the scenario did not happen"

    # Exactly one row for every call that got its finished event, wherever it ran.
    rows = rows_per_id(database.direct, finished)
    assert {i: rows.get(i, 0) for i in finished} == dict.fromkeys(finished, 1)
    # Every call c served in its first life without a row then (load calls, and a probe
    # that c answered before the kill on a slow run) has exactly one now: the replay.
    assert rows_per_id(database.direct, spooled) == dict.fromkeys(spooled, 1)
    assert len(finished) > 30


async def test_connection_age_moves_a_long_lived_clients_calls_across_replicas_and_cuts_no_stream(
    migrated_database_url: str, simulator: Simulator, tmp_path: Path
) -> None:
    env = replica_env(
        migrated_database_url,
        simulator,
        False,
        CHATGATE_MAX_CONNECTION_AGE_SECONDS="1",
        CHATGATE_DEADLINE_CAP_SECONDS="10",  # the grace: 20 s, past any stream here
    )
    members = [Replica(name, tmp_path, env) for name in ("x", "y", "z")]
    balancer = TcpBalancer([r.port for r in members])
    await balancer.start()
    try:
        async with replicas(*members), AsyncClient(f"127.0.0.1:{balancer.port}", timeout=15) as client:
            # A stream far longer than its connection may live: the GOAWAY must not cut it.
            long = asyncio.create_task(one_call(client, "gpt-4o-mini::chunks=30,delay_ms=100"))
            calls = []
            until = time.monotonic() + 4
            while time.monotonic() < until:
                calls.append(await one_call(client, "gpt-4o-mini::chunks=2"))
                await asyncio.sleep(0.05)
            stream = await long
    finally:
        await balancer.stop()
    assert (stream.outcome, stream.error) == (Outcome.COMPLETED, None)
    assert {(c.outcome, c.error) for c in calls} == {(Outcome.COMPLETED, None)}
    # One client, one target, one connection at a time: its calls still reached several
    # replicas, because each connection was recycled after about a second.
    ids = {c.request_id for c in calls}
    reached = [r.name for r in members if served_ids(r) & ids]
    assert len(reached) >= 2, reached
