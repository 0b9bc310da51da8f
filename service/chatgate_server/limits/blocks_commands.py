"""``chatgate block | unblock | blocks``: refuse a tenant, caller or user at once (DATABASE_URL).

Examples::

    chatgate block tenant acme --for 1h --reason "runaway batch job, ticket 4411"
    chatgate block caller acme/billing --reason "leaked token"          # until unblocked
    chatgate block user acme/u-42 --for 2d --reason "scraping" --by alice
    chatgate unblock user acme/u-42 --reason "talked to them"
    chatgate blocks                        # the blocks in force (= chatgate blocks list)
    chatgate blocks history --tenant acme  # every block and unblock, newest first

Every process of every replica refuses the subject's calls within a few seconds
(limits/blocks.py): PERMISSION_DENIED, reason BLOCKED, with the reason and the end time.
Each block and unblock is written to the audit with who (``--by``, default the OS user),
why and when.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from chatgate_server.auth.commands import positive_duration
from chatgate_server.limits.blocks_records import MAX_REASON, Scope, Subject
from chatgate_server.terminal import print_table

BLOCK_COMMANDS = ("block", "unblock", "blocks")


def default_actor() -> str:
    """Who runs the command, as the OS knows them."""
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment (a bare container)
        return "unknown"


def block_duration(text: str) -> timedelta:
    """``--for``: a duration of at least a minute (a block of 0m would end as it begins,
    yet read as done to whoever ran it)."""
    try:
        return positive_duration(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc}: a block lasts at least 1m (or leave --for out)") from None


def add_block_commands(sub: Any) -> None:
    """Add ``block``, ``unblock`` and ``blocks`` to the ``chatgate`` subparsers."""
    block = sub.add_parser("block", help="refuse a tenant's, caller's or user's calls on every replica")
    _subject(block)
    block.add_argument(
        "--for", dest="for_", type=block_duration, help="how long (30m, 12h, 2d); default until unblocked"
    )
    block.add_argument("--reason", required=True, help="why; the refused caller reads it")
    block.add_argument("--by", default=None, help="who decided (default: your OS user name)")
    unblock = sub.add_parser("unblock", help="lift a block")
    _subject(unblock)
    unblock.add_argument("--reason", default="", help="why (kept in the audit)")
    unblock.add_argument("--by", default=None, help="who decided (default: your OS user name)")
    listing = sub.add_parser("blocks", help="the blocks in force, or their history")
    listing.add_argument("view", nargs="?", choices=("list", "history"), default="list")
    listing.add_argument("--tenant", help="only this tenant")
    listing.add_argument("--limit", type=int, default=100, help="history: most lines (default 100)")


def _subject(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scope", choices=[s.value for s in Scope])
    parser.add_argument("subject", help="tenant: acme; caller: acme/billing; user: acme/u-42")


def run_block_command(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Run one of :data:`BLOCK_COMMANDS`; one clear line on stderr and exit 1 on failure."""
    from chatgate_server.config import database_url_from_env
    from chatgate_server.usage.dberrors import describe

    url = database_url_from_env()
    try:
        return asyncio.run(_run(url, args, out))
    except ValueError as exc:
        print(f"chatgate: {args.command}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback
        print(f"chatgate: {args.command} failed: {describe(exc, url)}", file=sys.stderr)
        return 1


async def _run(url: str, args: argparse.Namespace, out: TextIO) -> int:
    from psycopg_pool import AsyncConnectionPool

    from chatgate_server.usage.connect import session_kwargs, with_connect_timeout

    subject = Subject.parse(args.scope, args.subject) if args.command != "blocks" else None
    if len(getattr(args, "reason", "")) > MAX_REASON:
        raise ValueError(f"--reason is at most {MAX_REASON} characters")
    async with AsyncConnectionPool(
        with_connect_timeout(url), min_size=1, max_size=1, open=False, kwargs=session_kwargs()
    ) as pool:
        await pool.open(wait=True, timeout=10)
        if subject is None:
            return await _list(pool, args, out)
        return await _change(pool, subject, args, out)


async def _change(pool: Any, subject: Subject, args: argparse.Namespace, out: TextIO) -> int:
    from chatgate_server.limits import blocks_store
    from chatgate_server.limits.blocks_records import Source

    now = datetime.now(UTC)
    actor = args.by or default_actor()
    async with pool.connection() as conn, conn.transaction():
        if args.command == "block":
            until = now + args.for_ if args.for_ is not None else None
            await blocks_store.block(
                conn,
                subject,
                source=Source.OPERATOR,
                reason=args.reason,
                actor=actor,
                now=now,
                expires_at=until,
            )
            end = until.isoformat(timespec="seconds") if until else "until unblocked"
            print(
                f"blocked {subject.label} ({end}); every replica refuses its calls within seconds", file=out
            )
            return 0
        lifted = await blocks_store.unblock(conn, subject, actor=actor, reason=args.reason, now=now)
    print(f"unblocked {subject.label}" if lifted else f"{subject.label} was not blocked", file=out)
    return 0 if lifted else 1


async def _list(pool: Any, args: argparse.Namespace, out: TextIO) -> int:
    from chatgate_server.limits import blocks_store

    if args.view == "history":
        entries = await blocks_store.audit(pool, tenant=args.tenant, limit=args.limit)
        history: list[tuple[str, ...]] = [
            (
                _when(e.at),
                e.action,
                e.subject.label,
                e.source.value,
                e.actor,
                _until(e.expires_at, e.action),
                e.reason,
            )
            for e in entries
        ]
        print_table(("at", "action", "subject", "source", "by", "until", "reason"), history, out)
        return 0
    blocks = await blocks_store.active_blocks(pool, args.tenant)
    rows = [
        (
            b.subject.label,
            b.source.value,
            b.blocked_by,
            _when(b.blocked_at),
            _until(b.expires_at, "block"),
            b.reason,
        )
        for b in blocks
    ]
    print_table(("subject", "source", "by", "since", "until", "reason"), rows, out)
    return 0


def _when(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _until(at: datetime | None, action: str) -> str:
    if action != "block":
        return "-"
    return _when(at) if at is not None else "unblocked"
