"""``chatgate usage anomalies`` and ``chatgate anomalies policy``: the abuse detector's
findings, and what it may do about each tenant's (DATABASE_URL).

Examples::

    chatgate usage anomalies                    # findings of the last 24 hours
    chatgate usage anomalies --since 7d --tenant acme --format csv
    chatgate anomalies policy                   # every tenant's policy (no row: flag only)
    chatgate anomalies policy acme --escalate tighten --tighten-for 12h
    chatgate anomalies policy acme --escalate block --block-for 2h

``--escalate`` is the highest step the detector may take for the tenant: ``flag``
records, logs and counts a finding; ``tighten`` also adds detector limits to the
subject for ``--tighten-for``; ``block`` tightens a subject first and blocks it for
``--block-for`` when it is found again within 24 hours.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import sys
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from chatgate_server.auth.commands import positive_duration
from chatgate_server.terminal import print_table

ANOMALY_COMMANDS = ("anomalies",)
USAGE_VIEW = "anomalies"


def add_usage_anomalies(usage: argparse.ArgumentParser) -> None:
    """``chatgate usage anomalies``: a view under the ``usage`` command (whose own flags
    keep working: the view is optional)."""
    views = usage.add_subparsers(dest="usage_view", required=False, metavar="{anomalies}")
    view = views.add_parser(USAGE_VIEW, help="the abuse detector's findings and what it did")
    view.add_argument(
        "--since", dest="anomaly_since", default="24h", help="30m, 12h, 7d or a date (default 24h)"
    )
    view.add_argument("--tenant", dest="anomaly_tenant", help="only this tenant")
    view.add_argument(
        "--limit", dest="anomaly_limit", type=int, default=1000, help="most findings (default 1000)"
    )
    view.add_argument("--format", dest="anomaly_format", choices=("table", "csv"), default="table")


def add_anomaly_commands(sub: Any) -> None:
    """``chatgate anomalies policy``."""
    anomalies = sub.add_parser("anomalies", help="what the abuse detector may do about a tenant's findings")
    actions = anomalies.add_subparsers(dest="action", required=True)
    policy = actions.add_parser("policy", help="show, or set with --escalate, a tenant's detector policy")
    policy.add_argument("tenant", nargs="?", help="the tenant (omit to list every policy)")
    policy.add_argument("--escalate", choices=("flag", "tighten", "block"), help="the highest step allowed")
    policy.add_argument(
        "--tighten-for", type=positive_duration, help="how long detector limits last (default 24h)"
    )
    policy.add_argument(
        "--block-for", type=positive_duration, help="how long a detector block lasts (default 1h)"
    )
    policy.add_argument("--by", default=None, help="who decided (default: your OS user name)")


def wants_usage_anomalies(args: argparse.Namespace) -> bool:
    return args.command == "usage" and getattr(args, "usage_view", None) == USAGE_VIEW


def run_anomaly_command(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """``usage anomalies`` or ``anomalies policy``; one clear line on stderr on failure."""
    from chatgate_server.config import database_url_from_env
    from chatgate_server.usage.dberrors import describe

    url = database_url_from_env()
    name = "usage anomalies" if wants_usage_anomalies(args) else "anomalies policy"
    try:
        return asyncio.run(_run(url, args, out))
    except ValueError as exc:
        print(f"chatgate: {name}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback
        print(f"chatgate: {name} failed: {describe(exc, url)}", file=sys.stderr)
        return 1


async def _run(url: str, args: argparse.Namespace, out: TextIO) -> int:
    from psycopg_pool import AsyncConnectionPool

    from chatgate_server.usage.commands import parse_when
    from chatgate_server.usage.connect import session_kwargs, with_connect_timeout

    since = parse_when(args.anomaly_since, datetime.now(UTC)) if wants_usage_anomalies(args) else None
    async with AsyncConnectionPool(
        with_connect_timeout(url), min_size=1, max_size=1, open=False, kwargs=session_kwargs()
    ) as pool:
        await pool.open(wait=True, timeout=10)
        if since is not None:
            return await _list(pool, since, args, out)
        return await _policy(pool, args, out)


async def _list(pool: Any, since: datetime, args: argparse.Namespace, out: TextIO) -> int:
    from chatgate_server.limits.anomaly_store import findings

    if args.anomaly_limit < 1:
        raise ValueError("--limit must be at least 1")
    found = await findings(pool, since=since, tenant=args.anomaly_tenant, limit=args.anomaly_limit)
    header = (
        "found_at",
        "tenant",
        "subject",
        "rule",
        "measure",
        "observed",
        "usual",
        "threshold",
        "action",
        "detail",
    )
    rows = [
        (
            _when(f.found_at),
            f.tenant,
            f"{f.scope} {f.tenant}" + (f"/{f.subject}" if f.subject else ""),
            f.rule,
            f.measure,
            str(f.observed),
            f"{f.usual:.1f}",
            f"{f.threshold:.0f}",
            f.action + (f" until {_when(f.acted_until)}" if f.acted_until else ""),
            f.detail + (f" [{f.action_detail}]" if f.action_detail else ""),
        )
        for f in found
    ]
    if args.anomaly_format == "csv":
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows)
    else:
        print_table(header, rows, out)
        print(f"{len(rows)} finding(s) since {_when(since)}", file=out)
    return 0


async def _policy(pool: Any, args: argparse.Namespace, out: TextIO) -> int:
    from chatgate_server.limits import anomaly_store as store
    from chatgate_server.limits.anomaly_rules import Step
    from chatgate_server.limits.blocks_commands import default_actor

    if args.escalate is not None:
        if not args.tenant:
            raise ValueError("--escalate needs a tenant")
        current = next(iter(await store.list_policies(pool, args.tenant)), store.default_policy(args.tenant))
        policy = store.TenantPolicy(
            args.tenant,
            Step(args.escalate),
            args.tighten_for or current.tighten_for,
            args.block_for or current.block_for,
            args.by or default_actor(),
        )
        await store.set_policy(pool, policy)
        print(f"anomaly policy of {args.tenant}: escalate up to {policy.escalate.value}", file=out)
        return 0
    if args.tighten_for or args.block_for:
        raise ValueError("--tighten-for and --block-for go with --escalate")
    policies = await store.list_policies(pool, args.tenant)
    if args.tenant and not policies:
        policies = [store.default_policy(args.tenant)]
    rows = [
        (p.tenant, p.escalate.value, _span(p.tighten_for), _span(p.block_for), p.set_by or "-")
        for p in policies
    ]
    print_table(("tenant", "escalate", "tighten_for", "block_for", "set_by"), rows, out)
    return 0


def _span(span: timedelta) -> str:
    """``24h``, ``90m``, ``2d``: as the options take it."""
    seconds = int(span.total_seconds())
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _when(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
