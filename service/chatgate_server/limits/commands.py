"""``chatgate limits set | show | clear``: the operator's limits (DATABASE_URL).

Examples::

    chatgate limits set tenant acme --requests-per-minute 600 --tokens-per-day 2000000 \\
        --spend-per-month-usd 50
    chatgate limits set caller acme/billing --concurrent-streams 20
    chatgate limits set user acme/u-42 --tokens-per-day 100000 --model gpt-4o
    chatgate limits set user 'acme/*' --spend-per-day-usd 5      # each user of acme
    chatgate limits show [tenant acme | caller acme/billing | user acme/u-42]
    chatgate limits clear user acme/u-42 [--model gpt-4o] [--kind tokens_per_day]

Every process of every replica applies a change within about a second (limits/table.py).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from typing import Any, TextIO

from chatgate_server.domain import LimitKind
from chatgate_server.limits.definitions import SPEND_KINDS, Definition, Scope, Target
from chatgate_server.terminal import print_table

LIMITS_COMMAND = "limits"

# option name → (kind, whether the value is in dollars)
_OPTIONS: dict[str, tuple[LimitKind, bool]] = {
    "requests_per_minute": (LimitKind.REQUESTS_PER_MINUTE, False),
    "tokens_per_minute": (LimitKind.TOKENS_PER_MINUTE, False),
    "tokens_per_day": (LimitKind.TOKENS_PER_DAY, False),
    "spend_per_day_usd": (LimitKind.SPEND_PER_DAY, True),
    "spend_per_month_usd": (LimitKind.SPEND_PER_MONTH, True),
    "concurrent_streams": (LimitKind.CONCURRENT_STREAMS, False),
}


# The largest amount the limits table holds (bigint): past it Postgres refuses the row.
MAX_AMOUNT = 2**63 - 1
# The longest reason the table holds (migration 0009).
MAX_REASON = 1024


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a limit cannot be negative")
    if value > MAX_AMOUNT:
        raise argparse.ArgumentTypeError(f"a limit is at most {MAX_AMOUNT}")
    return value


def _dollars(text: str) -> int:
    """``50`` or ``12.5`` dollars → micro-dollars, without floats."""
    from chatgate_server.usage.pricing import usd_micros

    try:
        micros = usd_micros(text.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if micros > MAX_AMOUNT:
        raise argparse.ArgumentTypeError(f"a limit is at most ${MAX_AMOUNT // 1_000_000}")
    return micros


def add_limits_command(sub: Any) -> None:
    limits = sub.add_parser("limits", help="rate limits, budgets, concurrency: set, show, clear")
    actions = limits.add_subparsers(dest="action", required=True)
    set_ = actions.add_parser("set", help="set limits on a tenant, caller, user or each user of a tenant")
    _target(set_)
    for option, (kind, usd) in _OPTIONS.items():
        flag = "--" + option.replace("_", "-")
        set_.add_argument(
            flag, type=_dollars if usd else _count, help=f"{kind} ({'US dollars' if usd else 'count'})"
        )
    set_.add_argument("--reason", default="", help="why (kept with the limit)")
    show = actions.add_parser("show", help="the limits set (all, or one subject's)")
    show.add_argument("scope", nargs="?", choices=[s.value for s in Scope])
    show.add_argument("who", nargs="?", help="acme, acme/billing, acme/u-42 or 'acme/*'")
    clear = actions.add_parser("clear", help="remove a subject's limits (the operator's)")
    _target(clear)
    clear.add_argument("--kind", action="append", default=[], choices=[k.value for k in LimitKind])


def _target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scope", choices=[s.value for s in Scope])
    parser.add_argument(
        "who", help="tenant: acme; caller: acme/billing; user: acme/u-42, or 'acme/*' for each user"
    )
    parser.add_argument("--model", default="", help="only calls asking for this model (default: every model)")


def run_limits_command(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from chatgate_server.config import database_url_from_env

    try:
        url = database_url_from_env()
        return asyncio.run(_run(url, args, out))
    except ValueError as exc:
        print(f"chatgate: limits {args.action}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback
        print(f"chatgate: limits {args.action}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


async def _run(url: str, args: argparse.Namespace, out: TextIO) -> int:
    from psycopg_pool import AsyncConnectionPool

    from chatgate_server.limits.store import LimitStore
    from chatgate_server.usage.connect import session_kwargs

    target = Target.parse(args.scope, args.who, args.model) if args.action != "show" else None
    if args.action == "set":
        amounts = {kind: getattr(args, option) for option, (kind, _) in _OPTIONS.items()}
        chosen = {kind: amount for kind, amount in amounts.items() if amount is not None}
        if not chosen:
            raise ValueError("name at least one limit, e.g. --requests-per-minute 600")
        if len(args.reason) > MAX_REASON:
            raise ValueError(f"--reason is at most {MAX_REASON} characters")
    async with AsyncConnectionPool(url, min_size=1, max_size=1, open=False, kwargs=session_kwargs()) as pool:
        await pool.open(wait=True, timeout=10)
        store = LimitStore(pool)
        if args.action == "set" and target is not None:
            await store.set(target, chosen, set_by=_who_am_i(), reason=args.reason)
            print(
                f"{target.label}: " + ", ".join(f"{k} {_amount(k, a)}" for k, a in chosen.items()), file=out
            )
        elif args.action == "clear" and target is not None:
            count = await store.clear(target, [LimitKind(k) for k in args.kind])
            print(f"{target.label}: cleared {count} limit(s)", file=out)
            return 0 if count else 1
        else:
            _show(out, await store.definitions(), _filter(args))
    return 0


def _filter(args: argparse.Namespace) -> Target | None:
    if args.scope is None:
        return None
    if args.who is None:
        raise ValueError("name the subject: e.g. `limits show tenant acme`")
    return Target.parse(args.scope, args.who)


def _who_am_i() -> str:
    try:
        return getpass.getuser()[:256]
    except Exception:  # noqa: BLE001 - no login name (a container): still set the limit
        return ""


def _amount(kind: LimitKind, amount: int) -> str:
    if kind in SPEND_KINDS:
        return f"${amount // 1_000_000}.{amount % 1_000_000:06d}".rstrip("0").rstrip(".")
    return str(amount)


def _show(out: TextIO, definitions: list[Definition], only: Target | None) -> None:
    if only is not None:
        definitions = [
            d
            for d in definitions
            if (d.target.scope, d.target.tenant, d.target.subject) == (only.scope, only.tenant, only.subject)
        ]
    header = ("subject", "model", "kind", "limit", "source", "expires", "reason")
    rows = [
        (
            d.target.label.split("/model:")[0],
            d.target.model or "*",
            str(d.kind),
            _amount(d.kind, d.amount),
            d.source,
            d.expires_at.strftime("%Y-%m-%d %H:%M") if d.expires_at else "never",
            d.reason or "-",
        )
        for d in definitions
    ]
    if not rows:
        print("no limits set", file=out)
        return
    print_table(header, rows, out)
