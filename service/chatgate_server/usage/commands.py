"""Operator commands on the usage ledger: ``chatgate usage``, ``usage-retention``,
``usage-reprice``, ``usage-dead-letters``.

They talk to Postgres directly (``DATABASE_URL``) with an operator's view: every
tenant unless ``--tenant`` narrows it. Examples::

    chatgate usage --since 7d --by user                 # a table per user, last 7 days
    chatgate usage --since 2026-11-01 --by day,model --format csv
    chatgate usage --by tag:feature --user u-42         # one user's usage by the "feature" tag
    chatgate usage --vs-usual                           # top users in the last hour vs their usual
    chatgate usage-retention --dry-run                  # what dropping old months would remove
    chatgate usage-reprice --since 2026-11-01 --until 2026-11-08   # after fixing a price
    chatgate usage-dead-letters list                    # rows Postgres refused (CHATGATE_SPOOL_DIR)
    chatgate usage-dead-letters replay                  # retry them once the cause is fixed
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from chatgate_server.terminal import print_table, shown

if TYPE_CHECKING:
    from chatgate_server.usage.reports import Dimension, Group, Totals, UsageSpike

USAGE_COMMANDS = ("usage", "usage-retention", "usage-reprice", "usage-dead-letters")

_DURATION = re.compile(r"^(\d+)([mhdw])$")
_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}
_TOTAL_COLUMNS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "total_tokens",
    "cost_usd",
    "unpriced_requests",
)
# The table's label for rows without the grouped tag key (CSV leaves the cell empty).
UNTAGGED = "(untagged)"


def add_usage_commands(sub: Any) -> None:
    """Add the usage commands to the ``chatgate`` subparsers."""
    report = sub.add_parser(
        "usage",
        help="usage and cost from the ledger, as a table or CSV (DATABASE_URL)",
        description="Totals and breakdowns of usage over a time window, for every tenant unless --tenant.",
    )
    report.add_argument("--since", help="start: a duration back from now (30m, 12h, 7d, 2w) or a date/time")
    report.add_argument(
        "--until", help="end (exclusive): a duration back from now or a date/time (default now)"
    )
    report.add_argument(
        "--by",
        default="",
        help="comma-separated groupings: tenant, user, model, day, deployment, fallback, service_tier,"
        " tag:<key> (e.g. --by user,model)",
    )
    report.add_argument("--tenant", help="only this tenant")
    report.add_argument("--user", action="append", default=[], help="only this user (repeatable)")
    report.add_argument("--model", action="append", default=[], help="only this requested model (repeatable)")
    report.add_argument(
        "--tag", action="append", default=[], help="only rows with this tag, key=value (repeatable)"
    )
    report.add_argument("--sort", choices=("key", "cost"), default="key", help="group order (default key)")
    report.add_argument("--limit", type=int, default=1000, help="most groups printed (default 1000)")
    report.add_argument("--format", choices=("table", "csv"), default="table")
    report.add_argument(
        "--vs-usual",
        action="store_true",
        help="top users in the window (default 1h) next to their usual usage over --baseline",
    )
    report.add_argument(
        "--baseline", default="7d", help="with --vs-usual: days that define usual (default 7d)"
    )

    retention = sub.add_parser(
        "usage-retention",
        help="drop usage months older than the retention period (DATABASE_URL)",
        description="Keep the current month and the N months before it; drop older monthly partitions.",
    )
    retention.add_argument(
        "--months",
        type=int,
        help="months kept before the current one (default CHATGATE_USAGE_RETENTION_MONTHS, 13)",
    )
    retention.add_argument("--dry-run", action="store_true", help="say what would go, change nothing")

    reprice = sub.add_parser(
        "usage-reprice",
        help="recompute cost for a window from the price table (DATABASE_URL, CHATGATE_PRICES_FILE)",
        description=(
            "Recompute cost_usd_micros, price_version and cost_basis of rows in [--since, --until)"
            " from the shipped price table with CHATGATE_PRICES_FILE over it, each row at the price"
            " version in force when it started."
        ),
    )
    reprice.add_argument("--since", required=True, help="start: a duration back from now or a date/time")
    reprice.add_argument("--until", help="end (exclusive), default now")
    reprice.add_argument("--dry-run", action="store_true", help="count the changes, write nothing")

    dead = sub.add_parser(
        "usage-dead-letters",
        help="list or retry usage rows Postgres refused (CHATGATE_SPOOL_DIR, DATABASE_URL)",
        description="Usage rows Postgres refused for what they hold wait in the spool's dead-letter "
        "files; list them, or replay them once the cause is fixed.",
    )
    dead.add_argument("action", choices=("list", "replay"))
    dead.add_argument("--spool-dir", help="the spool directory (default CHATGATE_SPOOL_DIR, .chatgate/spool)")


def run_usage_command(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Run one of :data:`USAGE_COMMANDS`; one clear line on stderr and exit 1 on failure."""
    from chatgate_server.config import (
        database_url_from_env,
        prices_file_from_env,
        request_id_window_from_env,
        retention_months_from_env,
    )
    from chatgate_server.errors import ChatgateError
    from chatgate_server.usage.connect import CannotConnect
    from chatgate_server.usage.dberrors import describe

    if args.command == "usage-dead-letters" and args.action == "list":
        return _list_dead_letters(args, out)
    url = database_url_from_env()
    try:
        if args.command == "usage-dead-letters":
            return asyncio.run(_replay_dead_letters(url, args, out))
        if args.command == "usage-retention":
            months = args.months if args.months is not None else retention_months_from_env()
            window = timedelta(hours=request_id_window_from_env())
            return asyncio.run(_retention(url, months, window, args.dry_run, out))
        if args.command == "usage-reprice":
            now = datetime.now(UTC)
            since, until = parse_when(args.since, now), parse_when(args.until, now) if args.until else now
            prices_file = prices_file_from_env()
            return asyncio.run(_reprice(url, since, until, args.dry_run, prices_file, out))
        return asyncio.run(_report(url, args, out))
    except (ValueError, ChatgateError, CannotConnect) as exc:
        print(f"chatgate: {args.command}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback
        print(f"chatgate: {args.command} failed: {describe(exc, url)}", file=sys.stderr)
        return 1


def parse_when(text: str, now: datetime) -> datetime:
    """``7d`` → now − 7 days; ``2026-11-01`` → that UTC midnight; ISO date-times as given (UTC if naive)."""
    match = _DURATION.match(text.strip())
    if match:
        try:
            return now - int(match[1]) * _UNITS[match[2]]
        except OverflowError:  # past what a timedelta or year 1 can hold
            raise ValueError(f"{text[:40]!r} reaches back before the calendar does") from None
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (30m, 12h, 7d, 2w) nor a date/time") from None
    return parsed if parsed.utcoffset() is not None else parsed.replace(tzinfo=UTC)


def parse_by(text: str) -> tuple[tuple[Dimension, ...], str | None]:
    """``user,tag:feature`` → ((USER, TAG), "feature")."""
    from chatgate_server.usage.reports import Dimension

    dims: list[Dimension] = []
    tag_key = None
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, key = part.partition(":")
        try:
            dim = Dimension(name)
        except ValueError:
            raise ValueError(
                f"--by {part!r}: use tenant, user, model, day, deployment, fallback, service_tier"
                " or tag:<key>"
            ) from None
        if dim is Dimension.TAG:
            if not key:
                raise ValueError("--by tag needs a key: tag:<key>")
            tag_key = key
        dims.append(dim)
    return tuple(dims), tag_key


def usd(micros: int | float) -> str:
    """Micro-dollars as dollars with six decimals, exactly (no float for whole values)."""
    if isinstance(micros, float):
        return f"{micros / 1_000_000:.6f}"
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), 1_000_000)
    return f"{sign}{whole}.{frac:06d}"


async def _pool(url: str) -> Any:
    """A one-connection pool (what the reports take), or CannotConnect with the cause.

    One plain connection attempt first: a pool retries in the background, logging each
    failure, and reports only "PoolTimeout" in the end; an operator needs the reason, once.
    """
    from psycopg_pool import AsyncConnectionPool

    from chatgate_server.usage.connect import (
        DEFAULT_CONNECT_TIMEOUT_S,
        connect,
        session_kwargs,
        with_connect_timeout,
    )

    await (await connect(url)).close()
    pool: Any = AsyncConnectionPool(
        with_connect_timeout(url), min_size=1, max_size=1, open=False, kwargs=session_kwargs()
    )
    await pool.open(wait=True, timeout=2 * DEFAULT_CONNECT_TIMEOUT_S)
    return pool


async def _report(url: str, args: argparse.Namespace, out: TextIO) -> int:
    from chatgate_server.usage.reports import UsageQuery, usage_report, usage_spikes

    now = datetime.now(UTC)
    if args.limit < 1:
        raise ValueError("--limit must be at least 1")
    pool = await _pool(url)
    try:
        if args.vs_usual:
            window = now - parse_when(args.since or "1h", now)
            baseline = now - parse_when(args.baseline, now)
            spikes = await usage_spikes(
                pool, window=window, baseline=baseline, now=now, tenant=args.tenant, limit=args.limit
            )
            _print_spikes(spikes, args.format, out)
            return 0
        group_by, tag_key = parse_by(args.by)
        tags = {}
        for item in args.tag:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--tag {item!r}: use key=value")
            tags[key] = value
        query = UsageQuery(
            start=parse_when(args.since or "7d", now),
            end=parse_when(args.until, now) if args.until else now,
            group_by=group_by,
            tag_key=tag_key,
            tenant=args.tenant,
            user_ids=tuple(args.user),
            models=tuple(args.model),
            tags=tags,
        )
        groups: list[Group] = []
        after: tuple[str, ...] | None = None
        while True:
            page = await usage_report(
                pool,
                query,
                limit=min(args.limit - len(groups), 1000),
                after=after,
                order_by_cost=args.sort == "cost",
            )
            groups += page.groups
            after = page.next_after
            if after is None or len(groups) >= args.limit:
                break
        _print_report(query.group_by, groups, page.totals, args.format, out)
        return 0
    finally:
        await pool.close()


def _totals_row(t: Totals) -> list[str]:
    return [
        str(t.requests),
        str(t.input_tokens),
        str(t.output_tokens),
        str(t.cached_input_tokens),
        str(t.reasoning_tokens),
        str(t.total_tokens),
        usd(t.cost_usd_micros),
        str(t.unpriced_requests),
    ]


def _print_report(
    dims: Sequence[Dimension], groups: Sequence[Group], totals: Totals, fmt: str, out: TextIO
) -> None:
    header = [d.value for d in dims] + list(_TOTAL_COLUMNS)
    rows = [[g.key[d] for d in dims] + _totals_row(g.totals) for g in groups]
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows if dims else [_totals_row(totals)])
        return
    # A table cell cannot show "no value": rows without the tag key get a label.
    untagged = [i for i, d in enumerate(dims) if d.value == "tag"]  # Dimension.TAG
    rows = [[UNTAGGED if i in untagged and not c else c for i, c in enumerate(r)] for r in rows]
    footer = ["TOTAL"] + [""] * (len(dims) - 1) + _totals_row(totals) if dims else _totals_row(totals)
    print_table(header, rows, out, text_columns=len(dims), footer=footer, rules=True)


def _print_spikes(spikes: Sequence[UsageSpike], fmt: str, out: TextIO) -> None:
    header = [
        "tenant",
        "user",
        "requests",
        "total_tokens",
        "cost_usd",
        "usual_requests",
        "usual_tokens",
        "usual_cost_usd",
        "x_usual",
    ]
    rows = [
        [
            s.tenant,
            s.user_id,
            str(s.requests),
            str(s.total_tokens),
            usd(s.cost_usd_micros),
            f"{float(s.usual_requests):.1f}",
            f"{float(s.usual_tokens):.0f}",
            usd(float(s.usual_cost_usd_micros)),
            "new" if s.ratio is None else f"{s.ratio:.1f}",
        ]
        for s in spikes
    ]
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows)
        return
    print_table(header, rows, out, text_columns=2, rules=True)


async def _retention(url: str, months: int, window: timedelta, dry_run: bool, out: TextIO) -> int:
    from chatgate_server.usage.connect import connect
    from chatgate_server.usage.maintenance import apply_retention
    from chatgate_server.usage.reservations import count_expired, delete_expired

    async with await connect(url, autocommit=True) as conn:
        result = await apply_retention(conn, months, dry_run=dry_run)
        expired = await (count_expired if dry_run else delete_expired)(conn, window)
    verb = "would drop" if dry_run else "dropped"
    names = ", ".join(result.dropped_partitions) or "none"
    print(
        f"retention: keeping usage since {result.cutoff.isoformat()} ({months} month(s) before this one)",
        file=out,
    )
    print(f"{verb} partitions: {names}", file=out)
    print(
        f"{verb} {result.deleted_default_rows} row(s) from the default partition and "
        f"{result.deleted_daily_rows} roll-up row(s)",
        file=out,
    )
    print(f"{verb} {expired} expired request-id reservation(s) (CHATGATE_REQUEST_ID_WINDOW_HOURS)", file=out)
    return 0


def _deployment_prices(prices_file: Path | None) -> dict[str, Any]:
    """CHATGATE_CONFIG's deployments that are priced apart (their keys are not needed)."""
    import os

    from chatgate_server.deployments import deployment_prices, load_config

    config = os.environ.get("CHATGATE_CONFIG", "").strip()
    if not config:
        return {}
    return deployment_prices(load_config(Path(config), keys=False), prices_file)


async def _reprice(
    url: str, since: datetime, until: datetime, dry_run: bool, prices_file: Path | None, out: TextIO
) -> int:
    from chatgate_server.usage.connect import connect
    from chatgate_server.usage.maintenance import reprice
    from chatgate_server.usage.pricing import load_prices

    if until <= since:
        raise ValueError("--until must be after --since")
    prices = load_prices(prices_file)
    own = _deployment_prices(prices_file)
    async with await connect(url, autocommit=True) as conn:
        result = await reprice(conn, since, until, dry_run=dry_run, prices=prices, deployment_prices=own)
    verb = "would change" if dry_run else "changed"
    source = f"the shipped prices and {prices_file}" if prices_file else "the shipped prices"
    if own:
        source += f" (deployments {', '.join(sorted(own))}: their own prices_file)"
    versions = ", ".join(result.price_versions) or "none changed"
    print(
        f"repriced [{since.isoformat()}, {until.isoformat()}) from {source} (price versions: {versions}): "
        f"{result.examined} row(s) examined, {verb} {result.changed}, "
        f"cost delta {usd(result.cost_delta_usd_micros)} USD",
        file=out,
    )
    return 0


def _spool_root(args: argparse.Namespace) -> Path:
    from chatgate_server.config import spool_dir_from_env

    return Path(args.spool_dir) if args.spool_dir else spool_dir_from_env()


def _list_dead_letters(args: argparse.Namespace, out: TextIO) -> int:
    from chatgate_server.usage.dead_letters import dead_letter_files, read_dead_letters

    root = _spool_root(args)
    paths = dead_letter_files(root)
    letters = read_dead_letters(paths)
    for d in letters:
        r = d.record
        print(
            f"{r.started_at.isoformat()}  {shown(r.request_id[:80])}  tenant={shown(r.tenant[:40])}  "
            f"model={shown(r.requested_model[:60])}  {shown(d.error[:200])}",
            file=out,
        )
    print(f"{len(letters)} dead letter(s) in {len(paths)} file(s) under {root}", file=out)
    return 0


async def _replay_dead_letters(url: str, args: argparse.Namespace, out: TextIO) -> int:
    from chatgate_server.usage.dead_letters import replay
    from chatgate_server.usage.store import UsageStore

    root = _spool_root(args)
    pool = await _pool(url)
    try:
        result = await replay(UsageStore(pool).insert, root)
    finally:
        await pool.close()
    print(
        f"dead letters replayed: {result.stored} stored, {result.already_stored} already stored, "
        f"{len(result.refused)} still refused",
        file=out,
    )
    for d in result.refused:
        print(f"still refused: {shown(d.record.request_id[:80])}: {shown(d.error[:200])}", file=out)
    return 1 if result.refused else 0
