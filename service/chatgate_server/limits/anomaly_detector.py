"""The abuse detector: a background task that looks at live usage and acts per tenant policy.

One task per process wakes every ``interval_s``. A run is one transaction that first
takes a transaction-scoped advisory lock (``pg_try_advisory_xact_lock``) and checks when
the last run was: with several processes (workers, replicas) exactly one run per
interval does the work, the others see the lock taken or the run done and go back to
sleep. A transaction lock rather than a session one because it is released at commit —
it works through PgBouncer in transaction mode and cannot outlive a killed process.

A run evaluates the rules (limits/anomaly_rules.py), drops what it found recently
(``cooldown_s`` per subject and rule) and subjects already blocked, and for each new
finding — in the same transaction — records it, then acts as the tenant's policy says:

- ``flag`` (the default, no policy row): nothing more;
- ``tighten``: limits with source ``detector`` on the subject, for ``tighten_for``
  (a user: tokens and spend per day at half their usual day; a caller: requests per
  minute at half its last hour's rate); the limits engine applies the smallest
  unexpired amount, so they never loosen an operator's limit and lapse by themselves;
- ``block``: escalate in steps — a subject the detector has not acted on in the last
  24 h is tightened; one it already acted on is blocked for ``block_for``, recorded in
  the block audit as the detector's.

After commit, each finding is logged once (WARNING) and counted in the
``chatgate.anomalies`` metric by rule and action.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

import psycopg

from chatgate_server.background import stop_tasks
from chatgate_server.limits import anomaly_store as store
from chatgate_server.limits import blocks_store
from chatgate_server.limits.anomaly_rules import (
    CallerHour,
    Finding,
    Step,
    caller_spikes,
    refusal_bursts,
    step_for,
    usage_spikes,
    user_fanouts,
)
from chatgate_server.limits.anomaly_settings import ESCALATION_MEMORY, MAX_FINDINGS_PER_RUN, DetectorSettings
from chatgate_server.limits.blocks_records import Source

log = logging.getLogger(__name__)

# Bounds one run: a detector query that Postgres cannot answer in this long is dropped
# and tried again next interval, never left holding the lock.
RUN_TIMEOUT = "30s"
# Bounds the read of callers' baselines (days of rows, for a busy caller many): past it
# the run goes on without them, and those callers are not judged until the next day.
BASELINE_TIMEOUT = "10s"


class AnomalyDetector:
    def __init__(
        self,
        pool: store.Pool,
        settings: DetectorSettings,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_finding: Callable[[Finding, Step], None] | None = None,
    ) -> None:
        """``on_finding`` is told of each recorded finding after commit (the metric)."""
        self._pool = pool
        self._s = settings
        self._clock = clock
        self._on_finding = on_finding
        self._task: asyncio.Task[None] | None = None
        # Callers' baselines, by (tenant, caller), for the UTC day they were read on: the
        # baseline days end yesterday, so a caller's does not change within a day, and
        # reading it from the rows once a day keeps each run's reads small.
        self._baselines: dict[tuple[str, str], tuple[int, int, int]] = {}
        self._baselines_day: date | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="anomaly-detector")

    async def stop(self) -> None:
        await stop_tasks(self._task)
        self._task = None

    async def run_once(self) -> list[tuple[Finding, Step]] | None:
        """One run; the findings recorded with their step, or None when another process
        had this interval's run."""
        now = self._clock()
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL statement_timeout = '{RUN_TIMEOUT}'")
            if not await store.claim_run(conn, now, self._s.interval_s):
                return None
            new, policies, acted = await self._find(conn, now)
            done = [(finding, await self._act(conn, finding, policies, acted, now)) for finding in new]
            await store.forget_old_counts(conn, now - timedelta(days=1))
        for finding, step in done:
            log.warning(
                "anomaly: %s %s: %s; action %s",
                finding.rule.value,
                finding.subject.label,
                finding.detail,
                step.value,
            )
            if self._on_finding is not None:
                self._on_finding(finding, step)
        return done

    async def _find(
        self, conn: store.Conn, now: datetime
    ) -> tuple[list[Finding], dict[str, store.TenantPolicy], set[tuple[str, str, str]]]:
        """The new findings, the tenants' policies and the subjects acted on lately."""
        s = self._s
        found = usage_spikes(await store.user_hours(conn, now, s), s)
        found += caller_spikes(await self._caller_hours(conn, now), s)
        bursts = await store.refusal_counts(conn, now, s)
        fanouts = await store.new_user_counts(conn, now, s)
        rates = await store.hour_requests(conn, now, [(c.tenant, c.caller) for c in [*bursts, *fanouts]])
        found += refusal_bursts(bursts, rates, s) + user_fanouts(fanouts, rates, s)
        if not found:
            return [], {}, set()
        recent = await store.recently_found(conn, now - timedelta(seconds=s.cooldown_s))
        blocked = await blocks_store.blocked_now(conn, now)
        new = [f for f in found if f.key not in recent and f.subject.key not in blocked][
            :MAX_FINDINGS_PER_RUN
        ]
        policies = await store.policies(conn)
        acted = await store.acted_on(conn, now - ESCALATION_MEMORY)
        return new, policies, acted

    async def _caller_hours(self, conn: store.Conn, now: datetime) -> list[CallerHour]:
        hours = await store.caller_hours(conn, now, self._s)
        today = now.astimezone(UTC).date()
        if self._baselines_day != today:
            self._baselines, self._baselines_day = {}, today
        missing = [key for key in hours if key not in self._baselines]
        if missing:
            self._baselines.update(await self._read_baselines(conn, now, missing))
        return [
            CallerHour(tenant, caller, tokens, spend, *self._baselines[(tenant, caller)])
            for (tenant, caller), (tokens, spend) in hours.items()
        ]

    async def _read_baselines(
        self, conn: store.Conn, now: datetime, callers: list[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[int, int, int]]:
        """The callers' baselines — or, when reading them takes too long, none: a savepoint
        keeps the run's other reads and writes, and the per-user rule still judges
        these callers' users."""
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL statement_timeout = '{BASELINE_TIMEOUT}'")
                found = await store.caller_baselines(conn, now, self._s, callers)
                await conn.execute(f"SET LOCAL statement_timeout = '{RUN_TIMEOUT}'")
            return found
        except psycopg.errors.QueryCanceled:
            log.warning(
                "anomaly detector: reading %d callers' baselines took over %s; their spikes"
                " are not judged today",
                len(callers),
                BASELINE_TIMEOUT,
            )
            return dict.fromkeys(callers, (0, 0, 0))

    async def _act(
        self,
        conn: store.Conn,
        finding: Finding,
        policies: dict[str, store.TenantPolicy],
        acted: set[tuple[str, str, str]],
        now: datetime,
    ) -> Step:
        policy = policies.get(finding.subject.tenant) or store.default_policy(finding.subject.tenant)
        step = step_for(policy.escalate, finding.subject.key in acted)
        reason = f"abuse detector: {finding.rule.value}: {finding.detail}"
        until: datetime | None = None
        detail = ""
        if step is Step.TIGHTEN:
            until = now + policy.tighten_for
            await store.tighten(conn, finding, reason=reason, now=now, until=until)
            detail = ", ".join(f"{kind.value} {amount}" for kind, amount in finding.tighten)
        elif step is Step.BLOCK:
            until = now + policy.block_for
            await blocks_store.block(
                conn,
                finding.subject,
                source=Source.DETECTOR,
                reason=reason[:1024],
                actor="detector",
                now=now,
                expires_at=until,
            )
            detail = f"blocked {finding.subject.label}"
        await store.record(conn, finding, now=now, step=step, detail=detail, until=until)
        return step

    async def _loop(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._s.interval_s)
            try:
                await self.run_once()
            except Exception as exc:  # noqa: BLE001 - Postgres away or slow: try next interval
                if not failing:
                    log.warning("anomaly detector run failed: %s", type(exc).__name__)
                failing = True
            else:
                failing = False
