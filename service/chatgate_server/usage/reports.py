"""Reading usage: totals and breakdowns over a time window, for the UsageService and the CLI.

Whole UTC days of a window are read from ``usage_daily`` (one row per tenant, user, day
and model) and only the partial days at its edges from ``usage_records``, so a report
over months reads the small table. Grouping or filtering by tag needs the rows' tags,
so those reports read ``usage_records`` for the whole window (with the tenant/time
indexes).

Pagination is by key (keyset), never by offset: groups come in the order of their key
columns, and a page starts strictly after the last key of the previous one, so pages
neither skip nor repeat groups when rows arrive meanwhile. A :class:`PageToken` also
pins the window's end (an open window is resolved once, on the first page) and a hash
of the query, so a token cannot be replayed against a different query.

Scope: :attr:`UsageQuery.tenant` None reads every tenant; only the operator CLI does
that. The RPC layer always sets the caller's own tenant.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from fractions import Fraction
from typing import Any, LiteralString

import orjson
import psycopg
from psycopg import AsyncConnection, sql
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

from chatgate_server.errors import FieldViolation, InvalidRequest, ServiceUnavailable

Pool = AsyncConnectionPool[AsyncConnection[Any]]

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
MAX_WINDOW = timedelta(days=400)


class Dimension(enum.StrEnum):
    """What a report can be grouped by."""

    TENANT = "tenant"
    USER = "user"
    MODEL = "model"  # the requested model, as callers name it
    DAY = "day"  # UTC
    TAG = "tag"  # the value of one tag key ("" for rows without it)
    DEPLOYMENT = "deployment"  # the upstream deployment that served it ("" for none)
    FALLBACK = "fallback"  # the route's fallback model that served it ("" when the model asked for did)
    SERVICE_TIER = "service_tier"  # the tier the upstream said served it ("" when it said none)


# Column of the unified source for each dimension.
_KEY_COLUMN: dict[Dimension, LiteralString] = {
    Dimension.TENANT: "tenant",
    Dimension.USER: "user_id",
    Dimension.MODEL: "model",
    Dimension.DAY: "day",
    Dimension.TAG: "tag",
    Dimension.DEPLOYMENT: "deployment",
    Dimension.FALLBACK: "fallback",
    Dimension.SERVICE_TIER: "service_tier",
}

# Kept on the rows only (not in the daily rollup): grouping by them reads the rows.
_ROWS_ONLY = frozenset((Dimension.DEPLOYMENT, Dimension.FALLBACK, Dimension.SERVICE_TIER))

_SUMS: tuple[LiteralString, ...] = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "total_tokens",
    "cost_usd_micros",
    "unpriced_requests",
)


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """A window ``[start, end)``, filters, and the dimensions to group by."""

    start: datetime
    end: datetime
    group_by: tuple[Dimension, ...] = ()
    tag_key: str | None = None
    tenant: str | None = None
    """None: every tenant (operators only)."""
    user_ids: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)
    """Only rows carrying all of these tags."""

    def validate(self) -> None:
        """Raise InvalidRequest listing every problem."""
        v: list[FieldViolation] = []
        if self.start.utcoffset() is None or self.end.utcoffset() is None:
            v.append(FieldViolation("start_time", "times must carry a time zone"))
        elif self.end <= self.start:
            v.append(FieldViolation("end_time", "must be after start_time"))
        elif self.end - self.start > MAX_WINDOW:
            v.append(FieldViolation("start_time", f"a window is at most {MAX_WINDOW.days} days"))
        if len(set(self.group_by)) != len(self.group_by):
            v.append(FieldViolation("group_by", "a dimension may appear once"))
        if Dimension.TAG in self.group_by and not self.tag_key:
            v.append(FieldViolation("tag_key", "required when grouping by tag"))
        if self.tag_key and Dimension.TAG not in self.group_by:
            v.append(FieldViolation("tag_key", "only meaningful when grouping by tag"))
        if v:
            raise InvalidRequest(v)

    def fingerprint(self) -> str:
        """Identifies the query (window start included, end excluded: a token pins it)."""
        data = orjson.dumps(
            [
                self.start.isoformat(),
                [d.value for d in self.group_by],
                self.tag_key,
                self.tenant,
                sorted(self.user_ids),
                sorted(self.models),
                sorted(self.tags.items()),
            ]
        )
        return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Totals:
    """Sums over some rows. ``cost_usd_micros`` sums the priced rows only;
    ``unpriced_requests`` counts rows whose model had no price."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    cost_usd_micros: int = 0
    unpriced_requests: int = 0


@dataclass(frozen=True, slots=True)
class Group:
    """One group: its key (dimension → value; days as YYYY-MM-DD) and its sums."""

    key: Mapping[Dimension, str]
    totals: Totals


@dataclass(frozen=True, slots=True)
class UsagePage:
    totals: Totals
    groups: list[Group]
    next_after: tuple[str, ...] | None
    """The last group's key when more groups follow, else None."""


_BAD_TOKEN = "invalid page_token: not one this service issued, or it was changed"  # noqa: S105
MAX_PAGE_TOKEN_CHARS = 32 * 1024
# The oldest and latest instants a report may name: far enough apart for any real
# window, and far enough inside datetime's range that day arithmetic cannot overflow.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)


def page_token_key(secret: str) -> bytes:
    """The key that signs page tokens, derived from a secret every replica of a
    deployment shares (so a page from one worker continues on another)."""
    return hmac.new(secret.encode(), b"chatgate page tokens v1", hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class PageToken:
    """Where the next page starts, the window end it was computed for, and for which query.

    Encoded as base64url(JSON) "." base64url(HMAC-SHA256): a token that was not issued
    by a process holding the key, or was changed in any byte, is refused before any of
    it is read, and what it carries is validated all the same.
    """

    query: str
    end: datetime
    after: tuple[str, ...]

    def encode(self, key: bytes) -> str:
        data = orjson.dumps({"q": self.query, "e": self.end.isoformat(), "a": list(self.after)})
        return f"{_b64(data)}.{_b64(_mac(key, data))}"

    @classmethod
    def decode(cls, token: str, query: UsageQuery, key: bytes) -> PageToken:
        """Parse a token for ``query``; InvalidRequest if forged, changed, malformed or for
        another query."""
        data = _verified(token, key)
        try:
            d = orjson.loads(data)
            end = datetime.fromisoformat(d["e"])
            after = d["a"]
            parsed = cls(d["q"], end, tuple(after))
            valid = (
                type(parsed.query) is str
                and end.utcoffset() is not None
                and EARLIEST <= end <= LATEST
                and type(after) is list
                and all(type(a) is str and "\x00" not in a for a in after)
            )
            if valid:
                for dimension, value in zip(query.group_by, after, strict=False):
                    if dimension is Dimension.DAY:
                        date.fromisoformat(value)
        except (ValueError, KeyError, TypeError):
            valid = False
        if not valid:
            raise InvalidRequest([FieldViolation("page_token", _BAD_TOKEN)])
        if parsed.query != query.fingerprint() or len(parsed.after) != len(query.group_by):
            raise InvalidRequest(
                [FieldViolation("page_token", "belongs to a different query; repeat the first request")]
            )
        return parsed


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _verified(token: str, key: bytes) -> bytes:
    """The token's payload if its MAC is right; InvalidRequest otherwise."""
    body, _, mac = token.partition(".")
    data = expected = None
    if len(token) <= MAX_PAGE_TOKEN_CHARS and token.isascii():
        with contextlib.suppress(ValueError, binascii.Error):
            data, expected = _unb64(body), _unb64(mac)
    # Only the one canonical spelling counts: any other was changed on the way.
    if (
        data is None
        or expected is None
        or _b64(data) != body
        or _b64(expected) != mac
        or not hmac.compare_digest(_mac(key, data), expected)
    ):
        raise InvalidRequest([FieldViolation("page_token", _BAD_TOKEN)])
    return data


# --- the query ------------------------------------------------------------------------------


def _day_floor(t: datetime) -> datetime:
    u = t.astimezone(UTC)
    return datetime.combine(u.date(), time(), tzinfo=UTC)


def _split(start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """[start, end) as records [start, lo) + roll-up days [lo, hi) + records [hi, end)."""
    lo = _day_floor(start)
    if lo < start:
        lo += timedelta(days=1)
    hi = _day_floor(end)
    if hi <= lo:
        return end, end  # no whole day inside: all from records
    return lo, hi


def _filters(query: UsageQuery, model_column: LiteralString, params: dict[str, Any]) -> sql.Composable:
    parts: list[sql.Composable] = []
    if query.tenant is not None:
        parts.append(sql.SQL("tenant = %(tenant)s"))
        params["tenant"] = query.tenant
    if query.user_ids:
        parts.append(sql.SQL("user_id = ANY(%(users)s)"))
        params["users"] = list(query.user_ids)
    if query.models:
        parts.append(sql.SQL("{} = ANY(%(models)s)").format(sql.Identifier(model_column)))
        params["models"] = list(query.models)
    return sql.SQL("").join(sql.SQL(" AND ") + p for p in parts)


def _records(query: UsageQuery, a: str, b: str, params: dict[str, Any]) -> sql.Composable:
    tag = sql.SQL("coalesce(tags ->> %(tag_key)s, '')") if query.tag_key else sql.SQL("''")
    tags = sql.SQL(" AND tags @> %(tags)s::jsonb") if query.tags else sql.SQL("")
    if query.tags:
        params["tags"] = orjson.dumps(dict(query.tags)).decode()
    if query.tag_key:
        params["tag_key"] = query.tag_key
    return sql.SQL(
        "SELECT tenant, user_id, requested_model AS model, (started_at AT TIME ZONE 'UTC')::date AS day,"
        " {tag} AS tag, coalesce(deployment, '') AS deployment,"
        " coalesce(fallback_model, '') AS fallback, coalesce(service_tier, '') AS service_tier,"
        " 1::bigint AS requests,"
        " input_tokens, output_tokens, cached_input_tokens,"
        " reasoning_tokens, total_tokens, coalesce(cost_usd_micros, 0) AS cost_usd_micros,"
        " (cost_usd_micros IS NULL)::int::bigint AS unpriced_requests"
        " FROM usage_records WHERE started_at >= {a} AND started_at < {b}{filters}{tags}"
    ).format(
        tag=tag,
        a=sql.Placeholder(a),
        b=sql.Placeholder(b),
        filters=_filters(query, "requested_model", params),
        tags=tags,
    )


def _rollup(query: UsageQuery, params: dict[str, Any]) -> sql.Composable:
    return sql.SQL(
        "SELECT tenant, user_id, model, day, '' AS tag, '' AS deployment, '' AS fallback,"
        " '' AS service_tier, requests,"
        " input_tokens, output_tokens,"
        " cached_input_tokens, reasoning_tokens, total_tokens, cost_usd_micros, unpriced_requests"
        " FROM usage_daily WHERE day >= %(day_lo)s AND day < %(day_hi)s{filters}"
    ).format(filters=_filters(query, "model", params))


def _source(query: UsageQuery, end: datetime, params: dict[str, Any]) -> sql.Composable:
    params["start"], params["end"] = query.start, end
    if query.tag_key or query.tags or _ROWS_ONLY & set(query.group_by):
        # The daily rollup keeps no tags, deployments, fallbacks or tiers: rows only.
        return _records(query, "start", "end", params)
    lo, hi = _split(query.start, end)
    if lo >= hi:
        return _records(query, "start", "end", params)
    params["lo"], params["hi"] = lo, hi
    params["day_lo"], params["day_hi"] = lo.date(), hi.date()
    return sql.SQL(" UNION ALL ").join(
        [_records(query, "start", "lo", params), _rollup(query, params), _records(query, "hi", "end", params)]
    )


def _sum_list() -> sql.Composable:
    return sql.SQL(", ").join(
        sql.SQL("coalesce(sum({c}), 0)::bigint AS {c}").format(c=sql.Identifier(c)) for c in _SUMS
    )


def _key_expr(d: Dimension) -> sql.Composable:
    column = sql.Identifier(_KEY_COLUMN[d])
    # Text keys compare bytewise: the same order whatever the database's locale.
    return column if d is Dimension.DAY else sql.SQL('{} COLLATE "C"').format(column)


async def usage_report(
    pool: Pool,
    query: UsageQuery,
    *,
    limit: int = DEFAULT_PAGE_SIZE,
    after: Sequence[str] | None = None,
    order_by_cost: bool = False,
    statement_timeout_s: float = 30.0,
) -> UsagePage:
    """Totals over the whole query and up to ``limit`` groups after ``after``.

    ``order_by_cost`` sorts groups by cost then tokens, descending (for "top" views; no
    keyset pagination then). Raises InvalidRequest for a bad query and
    ServiceUnavailable when Postgres does not answer.
    """
    query.validate()
    params: dict[str, Any] = {"limit": limit + 1}
    source = _source(query, query.end, params)
    keys = [_key_expr(d) for d in query.group_by]
    key_names = [sql.Identifier(_KEY_COLUMN[d]) for d in query.group_by]
    totals_over = sql.SQL(", ").join(
        sql.SQL("sum({c}) OVER () AS {t}").format(c=sql.Identifier(c), t=sql.Identifier(f"all_{c}"))
        for c in _SUMS
    )
    if keys:
        grouped = sql.SQL("SELECT {names}, {sums} FROM src GROUP BY {names} HAVING sum(requests) > 0").format(
            names=sql.SQL(", ").join(key_names), sums=_sum_list()
        )
    else:
        grouped = sql.SQL("SELECT {sums} FROM src").format(sums=_sum_list())
    where: sql.Composable = sql.SQL("")
    if after is not None and keys:
        casts = [
            sql.SQL("{}::date").format(sql.Placeholder(f"after{i}"))
            if d is Dimension.DAY
            else sql.SQL('{} COLLATE "C"').format(sql.Placeholder(f"after{i}"))
            for i, d in enumerate(query.group_by)
        ]
        for i, value in enumerate(after):
            params[f"after{i}"] = value
        where = sql.SQL(" WHERE ({}) > ({})").format(sql.SQL(", ").join(keys), sql.SQL(", ").join(casts))
    order: sql.Composable
    if order_by_cost:
        order = sql.SQL("cost_usd_micros DESC, total_tokens DESC, requests DESC")
        if keys:
            order = sql.SQL("{}, {}").format(order, sql.SQL(", ").join(keys))
    else:
        order = sql.SQL(", ").join(keys) if keys else sql.SQL("1")
    statement = sql.SQL(
        "WITH src AS ({source}), grouped AS ({grouped}),"
        " totaled AS (SELECT g.*, {totals_over} FROM grouped g)"
        " SELECT * FROM totaled{where} ORDER BY {order} LIMIT %(limit)s"
    ).format(source=source, grouped=grouped, totals_over=totals_over, where=where, order=order)
    rows = await _fetch(pool, statement, params, statement_timeout_s)
    if not keys:
        row = rows[0] if rows else (0,) * len(_SUMS)
        return UsagePage(_totals(row[: len(_SUMS)]), [], None)
    n = len(query.group_by)
    groups = [
        Group(
            {d: _key_text(v) for d, v in zip(query.group_by, row[:n], strict=True)},
            _totals(row[n : n + len(_SUMS)]),
        )
        for row in rows[:limit]
    ]
    if rows:
        totals = _totals(rows[0][n + len(_SUMS) :])
    else:
        totals = (await usage_report(pool, replace(query, group_by=(), tag_key=None), limit=1)).totals
    more = len(rows) > limit and not order_by_cost
    next_after = tuple(groups[-1].key[d] for d in query.group_by) if more else None
    return UsagePage(totals, groups, next_after)


def _key_text(value: object) -> str:
    return value.isoformat() if isinstance(value, date) else str(value)


def _totals(values: Sequence[Any]) -> Totals:
    return Totals(*(int(v or 0) for v in values))


async def _fetch(
    pool: Pool, statement: sql.Composed, params: dict[str, Any], timeout_s: float
) -> list[tuple[Any, ...]]:
    try:
        async with (
            pool.connection(timeout=timeout_s) as conn,
            conn.transaction(),
            conn.cursor(row_factory=tuple_row) as cur,
        ):
            # A report must not hold a connection (or the table) for minutes.
            await cur.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(int(timeout_s * 1000)))
            await cur.execute(statement, params)
            return await cur.fetchall()
    except psycopg.errors.QueryCanceled:
        raise ServiceUnavailable(
            "the usage report took too long; narrow the window or the grouping"
        ) from None
    except psycopg.OperationalError:
        raise ServiceUnavailable("the usage database is not reachable right now") from None


# --- who is using far more than usual ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UsageSpike:
    """A user's usage in the window next to their usual usage for a window that long."""

    tenant: str
    user_id: str
    requests: int
    total_tokens: int
    cost_usd_micros: int
    usual_requests: Fraction
    usual_tokens: Fraction
    usual_cost_usd_micros: Fraction

    @property
    def ratio(self) -> float | None:
        """Tokens now ÷ usual tokens (None when there is no usual: a new user)."""
        return float(self.total_tokens / self.usual_tokens) if self.usual_tokens else None


async def usage_spikes(
    pool: Pool,
    *,
    window: timedelta,
    baseline: timedelta,
    now: datetime,
    tenant: str | None = None,
    limit: int = 20,
) -> list[UsageSpike]:
    """The users with the most tokens in ``[now − window, now)`` above their usual.

    "Usual" is the user's average for a window of that length over the whole UTC days
    of ``baseline`` before today, read from the roll-up. Sorted by tokens above usual.
    """
    days = max(1, baseline.days)
    today = now.astimezone(UTC).date()
    params: dict[str, Any] = {
        "start": now - window,
        "end": now,
        "day_lo": today - timedelta(days=days),
        "day_hi": today,
    }
    tenant_filter = sql.SQL("")
    if tenant is not None:
        tenant_filter = sql.SQL(" AND tenant = %(tenant)s")
        params["tenant"] = tenant
    statement = sql.SQL(
        "WITH cur AS ("
        " SELECT tenant, user_id, count(*) AS requests, sum(total_tokens) AS tokens,"
        " coalesce(sum(cost_usd_micros), 0) AS cost FROM usage_records"
        " WHERE started_at >= %(start)s AND started_at < %(end)s{tf} GROUP BY 1, 2"
        "), base AS ("
        " SELECT d.tenant, d.user_id, sum(d.requests) AS requests, sum(d.total_tokens) AS tokens,"
        " sum(d.cost_usd_micros) AS cost FROM usage_daily d JOIN cur USING (tenant, user_id)"
        " WHERE d.day >= %(day_lo)s AND d.day < %(day_hi)s GROUP BY 1, 2"
        ") SELECT cur.tenant, cur.user_id, cur.requests, cur.tokens, cur.cost,"
        " coalesce(base.requests, 0), coalesce(base.tokens, 0), coalesce(base.cost, 0)"
        " FROM cur LEFT JOIN base USING (tenant, user_id)"
    ).format(tf=tenant_filter)
    rows = await _fetch(pool, statement, params, 30.0)
    scale = Fraction(int(window.total_seconds()), days * 86400)
    spikes = [
        UsageSpike(
            tenant=str(t),
            user_id=str(u),
            requests=int(r),
            total_tokens=int(tok),
            cost_usd_micros=int(c),
            usual_requests=int(br) * scale,
            usual_tokens=int(bt) * scale,
            usual_cost_usd_micros=int(bc) * scale,
        )
        for t, u, r, tok, c, br, bt, bc in rows
    ]
    spikes.sort(key=lambda s: (s.total_tokens - s.usual_tokens, s.total_tokens), reverse=True)
    return spikes[:limit]


class UsageReports:
    """The reports over one connection pool: what the UsageService servicer calls."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def report(self, query: UsageQuery, *, limit: int, after: Sequence[str] | None = None) -> UsagePage:
        """See :func:`usage_report`."""
        return await usage_report(self._pool, query, limit=limit, after=after)
