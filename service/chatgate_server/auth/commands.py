"""``chatgate callers create | list | revoke | rotate``: service credentials (DATABASE_URL).

Examples::

    chatgate callers create --tenant acme --name billing-api --expires 90d
    chatgate callers list --tenant acme
    chatgate callers rotate --tenant acme --name billing-api --grace 24h
    chatgate callers revoke --tenant acme --name billing-api [--credential <public id>]

``create`` and ``rotate`` print the token once, alone on stdout (so a script can
capture it); chatgate keeps only its hash. Every process of every replica sees the
change within about a second (auth/table.py).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from chatgate_server.auth.records import KNOWN_ROLES
from chatgate_server.terminal import print_table

CALLERS_COMMAND = "callers"
_DURATION = re.compile(r"^([0-9]+)([mhdw])$")
_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}


# The longest duration a command takes: past it, leave the option out (until revoked,
# until unblocked). A timedelta overflows near 2.7 million years, a date in year 9999.
MAX_DURATION = timedelta(days=36_525)


def duration(text: str) -> timedelta:
    """``30m``, ``12h``, ``90d``, ``2w`` as a timedelta (argparse type), up to a century."""
    match = _DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a duration such as 30m, 12h, 90d or 2w")
    count = int(match[1])
    if count > MAX_DURATION / _UNITS[match[2]]:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is longer than {MAX_DURATION.days}d")
    return count * _UNITS[match[2]]


def positive_duration(text: str) -> timedelta:
    """A :func:`duration` of at least a minute: for what must last (a block, a detector
    policy's tightening), where 0m would end as it begins."""
    value = duration(text)
    if value <= timedelta(0):
        raise argparse.ArgumentTypeError(f"{text[:40]!r}: at least 1m")
    return value


def add_callers_command(sub: Any) -> None:
    callers = sub.add_parser("callers", help="service credentials: create, list, revoke, rotate")
    actions = callers.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="a new caller; prints its token once")
    _who(create)
    create.add_argument("--role", action="append", default=[], choices=sorted(KNOWN_ROLES))
    create.add_argument(
        "--allow-model", action="append", default=None, help="only this model (name or glob; repeatable)"
    )
    create.add_argument("--expires", type=duration, help="the credential expires after this long (e.g. 90d)")
    create.add_argument(
        "--certificate",
        metavar="IDENTITY",
        help="prove the caller by mTLS: its client certificate's URI SAN (e.g. a SPIFFE id) or subject;"
        " no token is made",
    )
    listing = actions.add_parser("list", help="callers and their credentials (never the tokens)")
    listing.add_argument("--tenant", help="only this tenant")
    revoke = actions.add_parser("revoke", help="revoke a caller's credentials (at once, on every replica)")
    _who(revoke)
    revoke.add_argument("--credential", action="append", default=[], help="only this credential's public id")
    rotate = actions.add_parser("rotate", help="a new token; the old ones stay valid for --grace")
    _who(rotate)
    rotate.add_argument("--grace", type=duration, default=timedelta(hours=24), help="default 24h")
    rotate.add_argument("--expires", type=duration, help="the new token expires after this long")


def _who(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--name", required=True, help="the calling service's name")


def run_callers_command(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from chatgate_server.config import database_url_from_env

    url = database_url_from_env()
    try:
        return asyncio.run(_run(url, args, out))
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback
        print(f"chatgate: callers {args.action}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


async def _run(url: str, args: argparse.Namespace, out: TextIO) -> int:
    from psycopg_pool import AsyncConnectionPool

    from chatgate_server.auth.store import CallerStore, NewCaller
    from chatgate_server.usage.connect import session_kwargs

    now = datetime.now(UTC)
    async with AsyncConnectionPool(url, min_size=1, max_size=1, open=False, kwargs=session_kwargs()) as pool:
        await pool.open(wait=True, timeout=10)
        store = CallerStore(pool)
        if args.action == "create":
            models = tuple(args.allow_model) if args.allow_model else None
            expires = now + args.expires if args.expires else None
            new = NewCaller(args.tenant, args.name, frozenset(args.role), models, expires, args.certificate)
            token = await store.create(new)
            if token is None:
                print(f"caller {args.tenant}/{args.name} proves itself with {args.certificate!r}", file=out)
            else:
                _print_token(out, token.public_id, str(token))
        elif args.action == "rotate":
            expires = now + args.expires if args.expires else None
            token = await store.rotate(args.tenant, args.name, grace=args.grace, expires_at=expires)
            _print_token(out, token.public_id, str(token))
        elif args.action == "revoke":
            count = await store.revoke(args.tenant, args.name, args.credential)
            print(f"revoked {count} credential(s) of {args.tenant}/{args.name}", file=out)
            return 0 if count else 1
        else:
            _print_listing(out, await store.credentials(args.tenant), now)
    return 0


def _print_token(out: TextIO, public_id: str, token: str) -> None:
    print(token, file=out)
    print(
        f"credential {public_id}: store this token now, it is not shown again "
        "(send it as 'authorization: Bearer <token>')",
        file=sys.stderr,
    )


def _print_listing(out: TextIO, credentials: list[Any], now: datetime) -> None:
    header = ("tenant", "caller", "credential", "roles", "status", "created", "expires")
    rows = [
        (
            c.tenant,
            c.caller_name,
            c.public_id,
            ",".join(sorted(c.roles)) or "-",
            c.status(now),
            c.created_at.strftime("%Y-%m-%d %H:%M"),
            c.expires_at.strftime("%Y-%m-%d %H:%M") if c.expires_at else "never",
        )
        for c in credentials
    ]
    print_table(header, rows, out)
