"""What authenticating one call costs: ``CallerTable.verify_token`` and the edge's whole
credential step (metadata scan + verify), on a table of ``--callers`` credentials.

    .venv/bin/python -m bench.auth [--callers 10000] [--calls 200000]

No database: the table is loaded once from an in-memory store, as a running process
holds it after its first load. Prints microseconds per call (best of ``--rounds``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any

from chatgate_server.auth import tokens
from chatgate_server.auth.records import Credential
from chatgate_server.auth.table import CallerTable
from chatgate_server.rpc.authn import Authenticator


class _Store:
    def __init__(self, credentials: list[Credential]) -> None:
        self._credentials = credentials

    async def version(self) -> int:
        return 1

    async def credentials(self, tenant: str | None = None) -> list[Credential]:
        return self._credentials


class _Context:
    """What the edge reads of a call: its metadata (a real call has a few pairs)."""

    def __init__(self, token: str) -> None:
        self._metadata = (
            ("user-agent", "grpc-python/1.70"),
            ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ("authorization", f"Bearer {token}"),
        )

    def invocation_metadata(self) -> Any:
        return self._metadata


def table_of(n: int) -> tuple[CallerTable, list[str]]:
    minted = [tokens.mint() for _ in range(n)]
    now = datetime.now(UTC)
    credentials = [
        Credential(
            public_id=t.public_id,
            tenant=f"tenant-{i % 100}",
            caller_name=f"svc-{i}",
            roles=frozenset(),
            allowed_models=None,
            token_sha256=tokens.digest(t.secret),
            created_at=now,
        )
        for i, t in enumerate(minted)
    ]
    table = CallerTable(_Store(credentials))  # type: ignore[arg-type]
    asyncio.run(table.refresh())
    return table, [str(t) for t in minted]


def per_call_us(fn: Any, args: list[Any], calls: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(calls):
            fn(args[i % len(args)])
        best = min(best, time.perf_counter() - t0)
    return best / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.auth", description=__doc__)
    parser.add_argument("--callers", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    table, texts = table_of(args.callers)
    authenticator = Authenticator(table)
    contexts = [_Context(t) for t in texts]
    result = {
        "callers": args.callers,
        "verify_token_us": round(per_call_us(table.verify_token, texts, args.calls, args.rounds), 3),
        "resolve_us": round(per_call_us(authenticator.resolve, contexts, args.calls, args.rounds), 3),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
