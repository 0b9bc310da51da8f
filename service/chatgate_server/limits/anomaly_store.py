"""The abuse detector's reads and writes in Postgres (schema: migrations 0001, 0009, 0011).

The reads aggregate in Postgres and return only what crossed a floor, so the detector
moves a handful of rows per run whatever the traffic. The functions that take a
connection run inside the detector's one transaction per run: its findings, the limits
it tightens and the blocks it sets commit together or not at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from chatgate_server.limits.anomaly_rules import CallerCount, Finding, Step, UserHour
from chatgate_server.limits.anomaly_settings import BURST_WINDOW, WINDOW, DetectorSettings
from chatgate_server.limits.blocks_records import Scope

Pool = AsyncConnectionPool[AsyncConnection[Any]]
Conn = AsyncConnection[Any]

# pg_try_advisory_xact_lock key of a detector run: b"cganomal" as a bigint. A transaction
# lock, not a session one: it is released at commit, so it works through PgBouncer in
# transaction mode, and a process that dies mid-run cannot keep it.
DETECTOR_LOCK_KEY = 7162800859299799404


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """What the detector may do about a tenant's findings."""

    tenant: str
    escalate: Step
    tighten_for: timedelta
    block_for: timedelta
    set_by: str = ""


DEFAULT_TIGHTEN_FOR = timedelta(hours=24)
DEFAULT_BLOCK_FOR = timedelta(hours=1)


def default_policy(tenant: str) -> TenantPolicy:
    """A tenant without a policy row: findings are flagged, nothing else."""
    return TenantPolicy(tenant, Step.FLAG, DEFAULT_TIGHTEN_FOR, DEFAULT_BLOCK_FOR)


@dataclass(frozen=True, slots=True)
class StoredFinding:
    """A finding as listed by ``chatgate usage anomalies``."""

    found_at: datetime
    tenant: str
    scope: str
    subject: str
    rule: str
    measure: str
    observed: int
    usual: float
    threshold: float
    detail: str
    action: str
    action_detail: str
    acted_until: datetime | None


async def claim_run(conn: Conn, now: datetime, interval_s: float) -> bool:
    """Inside the run's transaction: True if this process runs now — it holds the lock and
    no run happened within most of an interval — else False (another process has it)."""
    locked = await (
        await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (DETECTOR_LOCK_KEY,))
    ).fetchone()
    if not locked or not locked[0]:
        return False
    row = await (await conn.execute("SELECT last_run_at FROM anomaly_detector_state")).fetchone()
    last = row[0] if row else None
    if last is not None and last > now - timedelta(seconds=0.9 * interval_s):
        return False
    await conn.execute("UPDATE anomaly_detector_state SET last_run_at = %s", (now,))
    return True


def _day_bounds(start: datetime, days: int) -> dict[str, Any]:
    day = start.astimezone(UTC).date()
    return {
        "day_lo": day - timedelta(days=days),
        "day_hi": day,
        "day_start": datetime(day.year, day.month, day.day, tzinfo=UTC),
    }


def _hour_and_floors(now: datetime, s: DetectorSettings) -> dict[str, Any]:
    """The last hour's bounds and the floors below which nothing is a spike."""
    floors = {"token_floor": s.token_floor, "spend_floor": s.spend_floor_micros}
    return {"start": now - WINDOW, "end": now, **floors}


_USER_HOURS = """
    WITH cur AS (
        SELECT tenant, user_id, mode() WITHIN GROUP (ORDER BY caller_service) AS caller,
               sum(total_tokens) AS tokens, coalesce(sum(cost_usd_micros), 0) AS spend
        FROM usage_records WHERE started_at >= %(start)s AND started_at < %(end)s
        GROUP BY tenant, user_id
        HAVING sum(total_tokens) > %(token_floor)s OR coalesce(sum(cost_usd_micros), 0) > %(spend_floor)s
    ), base AS (
        SELECT d.tenant, d.user_id, sum(d.total_tokens) AS tokens, sum(d.cost_usd_micros) AS spend,
               %(day_hi)s - min(d.day) AS days
        FROM usage_daily d JOIN cur USING (tenant, user_id)
        WHERE d.day >= %(day_lo)s AND d.day < %(day_hi)s
        GROUP BY d.tenant, d.user_id
    )
    SELECT cur.tenant, cur.user_id, cur.caller, cur.tokens, cur.spend,
           coalesce(base.tokens, 0), coalesce(base.spend, 0), coalesce(base.days, 0)
    FROM cur LEFT JOIN base USING (tenant, user_id)
"""


async def user_hours(conn: Conn, now: datetime, s: DetectorSettings) -> list[UserHour]:
    """Users whose last hour is above a floor, with their baseline days' sums."""
    params = {**_hour_and_floors(now, s), **_day_bounds(now, s.baseline_days)}
    rows = await (await conn.execute(_USER_HOURS, params)).fetchall()
    return [
        UserHour(str(t), str(u), str(c), int(tk), int(sp), int(bt), int(bs), int(days))
        for t, u, c, tk, sp, bt, bs, days in rows
    ]


_CALLER_HOURS = """
    SELECT tenant, caller_service, sum(total_tokens), coalesce(sum(cost_usd_micros), 0)
    FROM usage_records WHERE started_at >= %(start)s AND started_at < %(end)s
    GROUP BY 1, 2
    HAVING sum(total_tokens) > %(token_floor)s OR coalesce(sum(cost_usd_micros), 0) > %(spend_floor)s
"""


async def caller_hours(
    conn: Conn, now: datetime, s: DetectorSettings
) -> dict[tuple[str, str], tuple[int, int]]:
    """(tenant, caller) → (tokens, spend) of the callers whose last hour is above a floor."""
    rows = await (await conn.execute(_CALLER_HOURS, _hour_and_floors(now, s))).fetchall()
    return {(str(t), str(c)): (int(tk), int(sp)) for t, c, tk, sp in rows}


_CALLER_BASELINES = """
    SELECT tenant, caller_service, sum(total_tokens), coalesce(sum(cost_usd_micros), 0),
           %(day_hi)s - min((started_at AT TIME ZONE 'UTC')::date)
    FROM usage_records
    WHERE started_at >= %(lo_start)s AND started_at < %(day_start)s
      AND (tenant, caller_service) IN (SELECT * FROM unnest(%(tenants)s::text[], %(callers)s::text[]))
    GROUP BY 1, 2
"""


async def caller_baselines(
    conn: Conn, now: datetime, s: DetectorSettings, callers: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(tenant, caller) → (tokens, spend, days) over the baseline days, for each of
    ``callers`` ((0, 0, 0) for one without rows then). From the rows — the daily
    roll-up has no caller — so the detector asks once per caller per UTC day."""
    keys = sorted(set(callers))
    if not keys:
        return {}
    bounds = _day_bounds(now, s.baseline_days)
    params = {
        **bounds,
        "lo_start": bounds["day_start"] - timedelta(days=s.baseline_days),
        "tenants": [t for t, _ in keys],
        "callers": [c for _, c in keys],
    }
    rows = await (await conn.execute(_CALLER_BASELINES, params)).fetchall()
    found = {(str(t), str(c)): (int(tk), int(sp), int(days)) for t, c, tk, sp, days in rows}
    return {key: found.get(key, (0, 0, 0)) for key in keys}


_REFUSALS = """
    WITH refused AS (
        SELECT tenant, caller_service AS caller, user_id, count(*) AS n FROM usage_records
        WHERE started_at >= %(start)s AND started_at < %(end)s
          AND outcome = 'rejected' AND grpc_status <> 'PERMISSION_DENIED'
        GROUP BY 1, 2, 3
        UNION ALL
        SELECT tenant, caller, '', sum(calls) FROM refusal_counts
        WHERE minute >= date_trunc('minute', %(start)s::timestamptz) AND minute < %(end)s
        GROUP BY 1, 2
    ), ranked AS (
        SELECT tenant, caller, user_id, n, sum(n) OVER (PARTITION BY tenant, caller) AS total,
               row_number() OVER (PARTITION BY tenant, caller ORDER BY (user_id <> '') DESC, n DESC) AS rank
        FROM refused
    )
    SELECT tenant, caller, total, user_id, n FROM ranked WHERE rank = 1 AND total >= %(threshold)s
"""


async def refusal_counts(conn: Conn, now: datetime, s: DetectorSettings) -> list[CallerCount]:
    """Callers with at least the burst threshold of refusals in the burst window, each
    with the user who had the most of them (rows only: edge counts name no user)."""
    params = {"start": now - BURST_WINDOW, "end": now, "threshold": s.refusal_burst}
    rows = await (await conn.execute(_REFUSALS, params)).fetchall()
    return [CallerCount(str(t), str(c), int(total), str(u), int(n) if u else 0) for t, c, total, u, n in rows]


_NEW_USERS = """
    WITH cur AS (
        SELECT tenant, caller_service AS caller, user_id FROM usage_records
        WHERE started_at >= %(start)s AND started_at < %(end)s
        GROUP BY 1, 2, 3
    ), wide AS (
        SELECT tenant, caller FROM cur GROUP BY 1, 2 HAVING count(*) >= %(threshold)s
    )
    SELECT c.tenant, c.caller, count(*) FROM cur c JOIN wide USING (tenant, caller)
    WHERE NOT EXISTS (
        SELECT 1 FROM usage_daily d WHERE d.tenant = c.tenant AND d.user_id = c.user_id
          AND d.day >= %(day_lo)s AND d.day < %(day_hi)s)
      AND NOT EXISTS (
        SELECT 1 FROM usage_records r WHERE r.tenant = c.tenant AND r.user_id = c.user_id
          AND r.started_at >= %(day_start)s AND r.started_at < %(start)s)
    GROUP BY 1, 2 HAVING count(*) >= %(threshold)s
"""


async def new_user_counts(conn: Conn, now: datetime, s: DetectorSettings) -> list[CallerCount]:
    """Callers that brought at least the fan-out threshold of new user ids in the window."""
    start = now - WINDOW
    params = {"start": start, "end": now, "threshold": s.new_users, **_day_bounds(start, s.baseline_days)}
    rows = await (await conn.execute(_NEW_USERS, params)).fetchall()
    return [CallerCount(str(t), str(c), int(n)) for t, c, n in rows]


async def hour_requests(
    conn: Conn, now: datetime, callers: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], int]:
    """Calls of each of ``callers`` (tenant, caller) in the last hour."""
    keys = sorted(set(callers))
    if not keys:
        return {}
    rows = await (
        await conn.execute(
            "SELECT tenant, caller_service, count(*) FROM usage_records"
            " WHERE started_at >= %s AND started_at < %s"
            " AND (tenant, caller_service) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"
            " GROUP BY 1, 2",
            (now - WINDOW, now, [t for t, _ in keys], [c for _, c in keys]),
        )
    ).fetchall()
    return {(str(t), str(c)): int(n) for t, c, n in rows}


async def recently_found(conn: Conn, since: datetime) -> set[tuple[str, str, str, str]]:
    """(scope, tenant, subject, rule) of the findings since ``since``."""
    rows = await (
        await conn.execute(
            "SELECT DISTINCT scope, tenant, subject, rule FROM anomalies WHERE found_at > %s", (since,)
        )
    ).fetchall()
    return {(str(a), str(b), str(c), str(d)) for a, b, c, d in rows}


async def acted_on(conn: Conn, since: datetime) -> set[tuple[str, str, str]]:
    """(scope, tenant, subject) the detector tightened or blocked since ``since``."""
    rows = await (
        await conn.execute(
            "SELECT DISTINCT scope, tenant, subject FROM anomalies WHERE found_at > %s AND action <> 'flag'",
            (since,),
        )
    ).fetchall()
    return {(str(a), str(b), str(c)) for a, b, c in rows}


async def policies(conn: Conn) -> dict[str, TenantPolicy]:
    rows = await (
        await conn.execute("SELECT tenant, escalate, tighten_for, block_for, set_by FROM anomaly_policies")
    ).fetchall()
    return {str(t): TenantPolicy(str(t), Step(e), tf, bf, str(by)) for t, e, tf, bf, by in rows}


async def tighten(conn: Conn, finding: Finding, *, reason: str, now: datetime, until: datetime) -> None:
    """Detector limits for the finding's subject (limits' source 'detector'): the limits
    engine applies the smallest unexpired amount, so this never loosens an operator's."""
    subject = finding.subject
    name = "" if subject.scope is Scope.TENANT else subject.name
    for kind, amount in finding.tighten:
        await conn.execute(
            "INSERT INTO limits (scope, tenant, subject, model, kind, source, amount, expires_at, reason,"
            " set_by, set_at) VALUES (%s, %s, %s, '', %s, 'detector', %s, %s, %s, 'detector', %s)"
            " ON CONFLICT (tenant, scope, subject, model, kind, source) DO UPDATE SET"
            " amount = excluded.amount, expires_at = excluded.expires_at, reason = excluded.reason,"
            " set_by = excluded.set_by, set_at = excluded.set_at",
            (subject.scope.value, subject.tenant, name, kind.value, amount, until, reason[:1024], now),
        )


async def record(
    conn: Conn, finding: Finding, *, now: datetime, step: Step, detail: str, until: datetime | None
) -> None:
    s = finding.subject
    await conn.execute(
        "INSERT INTO anomalies (found_at, tenant, scope, subject, rule, measure, observed, usual, threshold,"
        " detail, action, action_detail, acted_until)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            now,
            s.tenant,
            s.scope.value,
            s.name,
            finding.rule.value,
            finding.measure,
            finding.observed,
            finding.usual,
            finding.threshold,
            finding.detail,
            step.value,
            detail,
            until,
        ),
    )


async def forget_old_counts(conn: Conn, before: datetime) -> None:
    """Edge refusal counts older than any window the detector reads."""
    await conn.execute("DELETE FROM refusal_counts WHERE minute < %s", (before,))


async def add_refusal_counts(pool: Pool, counts: Mapping[tuple[datetime, str, str, str], int]) -> None:
    """Add one process's counts (minute, tenant, caller, reason) → calls, in one statement."""
    if not counts:
        return
    keys = list(counts)
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO refusal_counts (minute, tenant, caller, reason, calls)"
            " SELECT * FROM unnest(%s::timestamptz[], %s::text[], %s::text[], %s::text[], %s::bigint[])"
            " ON CONFLICT (minute, tenant, caller, reason)"
            " DO UPDATE SET calls = refusal_counts.calls + excluded.calls",
            (
                [k[0] for k in keys],
                [k[1] for k in keys],
                [k[2] for k in keys],
                [k[3] for k in keys],
                [counts[k] for k in keys],
            ),
        )


async def set_policy(pool: Pool, policy: TenantPolicy) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO anomaly_policies (tenant, escalate, tighten_for, block_for, set_by, set_at)"
            " VALUES (%s, %s, %s, %s, %s, now()) ON CONFLICT (tenant) DO UPDATE SET"
            " escalate = excluded.escalate, tighten_for = excluded.tighten_for,"
            " block_for = excluded.block_for, set_by = excluded.set_by, set_at = excluded.set_at",
            (policy.tenant, policy.escalate.value, policy.tighten_for, policy.block_for, policy.set_by),
        )


async def list_policies(pool: Pool, tenant: str | None = None) -> list[TenantPolicy]:
    async with pool.connection() as conn:
        found = await policies(conn)
    return [p for t, p in sorted(found.items()) if tenant is None or t == tenant]


async def findings(
    pool: Pool, *, since: datetime, tenant: str | None = None, limit: int = 1000
) -> list[StoredFinding]:
    """Findings since ``since``, newest first."""
    query = (
        "SELECT found_at, tenant, scope, subject, rule, measure, observed, usual, threshold, detail,"
        " action, action_detail, acted_until FROM anomalies WHERE found_at >= %s"
    )
    params: tuple[Any, ...] = (since,)
    if tenant is not None:
        query += " AND tenant = %s"
        params += (tenant,)
    async with pool.connection() as conn:
        rows = await (
            await conn.execute(query + " ORDER BY found_at DESC, id DESC LIMIT %s", (*params, limit))
        ).fetchall()
    return [StoredFinding(*row) for row in rows]
