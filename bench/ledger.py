"""The usage ledger's numbers: sustained rows/s into Postgres, and what it adds to a request.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m bench.ledger

Works in a database of its own (created, migrated and dropped). Three parts:

1. **Throughput.** Records are submitted as fast as a producer can (in bursts, yielding
   to the loop between them, like requests finishing) and the clock stops when the last
   one is in Postgres. Per batch size: rows/s, and how long one ``submit()`` takes —
   the only ledger work a request ever does.
2. **Loop lag.** While the writer runs flat out, a ticker measures how late its 1 ms
   sleeps wake up, against an idle loop: the cost the background writer imposes on
   every other coroutine (streams being relayed) on the same event loop.
3. **End to end.** A real chatgate (in process) and the simulator; closed-loop clients
   stream short completions. Request latency with the ledger swapped for a sink that
   drops records, with the ledger writing to Postgres, and with Postgres unreachable
   (everything goes to the spool). Equal columns mean the ledger adds nothing a
   request can notice, whether Postgres is there or not.

Numbers are written down in the issue note; this is not a test and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import tempfile
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc
from chatgate_server.app import App
from chatgate_server.config import Settings
from chatgate_server.domain import Outcome, TokenUsage, UsageRecord
from chatgate_server.simulator import Simulator
from chatgate_server.telemetry import NO_TELEMETRY
from chatgate_server.usage.ledger import UsageLedger
from chatgate_server.usage.migrate import apply_migrations
from chatgate_server.usage.pricing import cost_of
from chatgate_server.usage.spool import Spool
from chatgate_server.usage.store import UsageStore


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else float("nan")


def records(n: int) -> list[UsageRecord]:
    usage = TokenUsage(input_tokens=812, output_tokens=230, cached_input_tokens=128, reasoning_tokens=0)
    base = UsageRecord(
        request_id="",
        tenant="bench",
        caller_service="svc",
        user_id="",
        requested_model="gpt-4o-mini",
        resolved_model="gpt-4o-mini-2024-07-18",
        upstream_response_id="chatcmpl-bench",
        usage=usage,
        cost=cost_of("gpt-4o-mini", usage),
        outcome=Outcome.COMPLETED,
        grpc_status="OK",
        finish_reason="stop",
        attempts=1,
        time_to_first_token_ms=123.4,
        duration_ms=2345.6,
        started_at=datetime.now(UTC),
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        tags={"feature": "bench"},
    )
    now = datetime.now(UTC)
    return [
        replace(base, request_id=uuid.uuid4().hex, user_id=f"user-{i % 500}", started_at=now)
        for i in range(n)
    ]


async def ticker(lags: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append((time.perf_counter() - t - 0.001) * 1000)


async def throughput(url: str, n: int, batch_size: int) -> dict[str, float]:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(url, min_size=2, max_size=4, open=False)
    await pool.open(wait=True)
    with tempfile.TemporaryDirectory() as spool_dir:
        spool = Spool(Path(spool_dir), max_bytes=1 << 30)
        spool.open()
        ledger = UsageLedger(UsageStore(pool), spool, queue_size=n + 1, batch_size=batch_size)
        ledger.start()
        batch = records(n)
        lags: list[float] = []
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(lags, stop))
        submit_ns: list[int] = []
        t0 = time.perf_counter()
        for i, r in enumerate(batch):
            s = time.perf_counter_ns()
            ledger.submit(r)
            submit_ns.append(time.perf_counter_ns() - s)
            if i % 200 == 199:
                await asyncio.sleep(0)  # requests finish over time, not in one tick
        await ledger.wait_stored()
        elapsed = time.perf_counter() - t0
        stop.set()
        await tick
        stats = ledger.stats()
        await ledger.close()
        spool.close()
    await pool.close()
    assert stats.written == n, stats
    return {
        "batch_size": batch_size,
        "rows": n,
        "seconds": elapsed,
        "rows_per_s": n / elapsed,
        "submit_p50_us": pct([x / 1000 for x in submit_ns], 50),
        "submit_p99_us": pct([x / 1000 for x in submit_ns], 99),
        "lag_p50_ms": pct(lags, 50),
        "lag_p99_ms": pct(lags, 99),
        "lag_max_ms": max(lags) if lags else float("nan"),
    }


async def steady(url: str, rate: int, seconds: float) -> dict[str, float]:
    """Rows at a steady ``rate`` per second (requests finishing), loop lag measured meanwhile."""
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(url, min_size=2, max_size=4, open=False)
    await pool.open(wait=True)
    with tempfile.TemporaryDirectory() as spool_dir:
        spool = Spool(Path(spool_dir), max_bytes=1 << 30)
        spool.open()
        ledger = UsageLedger(UsageStore(pool), spool)
        ledger.start()
        batch = records(int(rate * seconds))
        lags: list[float] = []
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(lags, stop))
        per_tick = max(1, rate // 100)
        t0 = time.perf_counter()
        for i in range(0, len(batch), per_tick):
            for r in batch[i : i + per_tick]:
                ledger.submit(r)
            await asyncio.sleep(max(0.0, t0 + (i + per_tick) / rate - time.perf_counter()))
        await ledger.wait_stored()
        stop.set()
        await tick
        await ledger.close()
        spool.close()
    await pool.close()
    return {"lag_p50_ms": pct(lags, 50), "lag_p99_ms": pct(lags, 99), "lag_max_ms": max(lags)}


async def idle_lag(seconds: float) -> dict[str, float]:
    lags: list[float] = []
    stop = asyncio.Event()
    tick = asyncio.create_task(ticker(lags, stop))
    await asyncio.sleep(seconds)
    stop.set()
    await tick
    return {"lag_p50_ms": pct(lags, 50), "lag_p99_ms": pct(lags, 99), "lag_max_ms": max(lags)}


class DropSink:
    """Stands in for the ledger: the request hands its record over and nothing happens."""

    def submit(self, record: UsageRecord) -> None:
        pass


async def e2e(url: str, sim: Simulator, mode: str, requests: int, concurrency: int) -> dict[str, Any]:
    spool_dir = tempfile.mkdtemp(prefix="bench-spool-")
    settings = Settings.from_env(
        {
            "OPENAI_API_KEY": "sk-bench",
            "OPENAI_BASE_URL": sim.base_url,
            "DATABASE_URL": url if mode != "postgres-away" else "postgresql://postgres@127.0.0.1:1/none",
            "CHATGATE_LISTEN": "127.0.0.1:0",
            "CHATGATE_SPOOL_DIR": spool_dir,
            "CHATGATE_LOG_LEVEL": "ERROR",
            # What the ledger costs, not authentication (and postgres-away has no callers).
            "CHATGATE_AUTH": "off",
        }
    )
    app = App(settings, telemetry=NO_TELEMETRY)
    await app.start()
    if mode == "no-ledger":
        assert app.service is not None
        app.service._ledger = DropSink()  # bench only: the same service without the ledger
    latencies: list[float] = []
    remaining = requests

    async def worker(stub: Any) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            req = pb.CompleteRequest(
                model="gpt-4o-mini::chunks=8",
                user_id="bench-user",
                messages=[pb.Message(role=pb.ROLE_USER, text="Say something short.")],
            )
            t = time.perf_counter()
            async for _ in stub.Complete(req, timeout=30):
                pass
            latencies.append((time.perf_counter() - t) * 1000)

    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") for _ in range(8)]
    stubs = [chat_pb2_grpc.ChatServiceStub(c) for c in channels]
    # Warm up connections and code paths, then measure.
    await asyncio.gather(*(worker(stubs[i % 8]) for i in range(concurrency)))
    latencies.clear()
    remaining = requests
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(stubs[i % 8]) for i in range(concurrency)))
    elapsed = time.perf_counter() - t0
    ledger_stats = app.ledger.stats() if app.ledger else None
    for c in channels:
        await c.close()
    await app.stop(0)
    return {
        "mode": mode,
        "requests_per_s": requests / elapsed,
        "p50_ms": statistics.median(latencies),
        "p99_ms": pct(latencies, 99),
        "spooled": ledger_stats.spooled if ledger_stats else 0,
        "written": ledger_stats.written if ledger_stats else 0,
    }


async def main_async(args: argparse.Namespace) -> None:
    admin = args.database_url
    name = f"chatgate_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(admin)
    params["dbname"] = name
    url = make_conninfo(**params)  # type: ignore[arg-type]
    try:
        apply_migrations(url)
        print("== throughput: rows submitted as fast as possible, until all are in Postgres")
        print(
            f"{'batch':>6} {'rows':>8} {'s':>6} {'rows/s':>9} {'submit p50/p99 µs':>18}"
            f" {'loop lag p50/p99/max ms':>24}"
        )
        for batch in args.batch_sizes:
            r = await throughput(url, args.rows, batch)
            print(
                f"{batch:>6} {r['rows']:>8} {r['seconds']:>6.2f} {r['rows_per_s']:>9.0f} "
                f"{r['submit_p50_us']:>8.2f} / {r['submit_p99_us']:<7.2f} "
                f"{r['lag_p50_ms']:>7.2f} / {r['lag_p99_ms']:.2f} / {r['lag_max_ms']:.2f}"
            )
        idle = await idle_lag(2.0)
        for rate in (1000, 5000):
            r = await steady(url, rate, 5.0)
            print(
                f"steady {rate} rows/s, loop lag p50/p99/max ms: "
                f"{r['lag_p50_ms']:.2f} / {r['lag_p99_ms']:.2f} / {r['lag_max_ms']:.2f}"
            )
        print(
            "idle loop lag p50/p99/max ms: "
            f"{idle['lag_p50_ms']:.2f} / {idle['lag_p99_ms']:.2f} / {idle['lag_max_ms']:.2f}"
        )

        print(
            f"\n== end to end: {args.requests} streams, {args.concurrency} concurrent, 8 chunks each;"
            f" medians of {args.rounds} interleaved rounds"
        )
        sim = Simulator()
        await sim.start()
        modes = ("no-ledger", "ledger", "postgres-away")
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        try:
            for round_ in range(args.rounds):
                for mode in modes[round_ % 3 :] + modes[: round_ % 3]:
                    runs[mode].append(await e2e(url, sim, mode, args.requests, args.concurrency))
        finally:
            await sim.stop()
        for mode in modes:
            rs = runs[mode]
            print(
                f"{mode:>14}: {statistics.median(r['requests_per_s'] for r in rs):>7.0f} req/s"
                f"  p50 {statistics.median(r['p50_ms'] for r in rs):6.2f} ms"
                f"  p99 {statistics.median(r['p99_ms'] for r in rs):6.2f} ms"
                f"  (rows written {sum(r['written'] for r in rs)}, spooled {sum(r['spooled'] for r in rs)})"
            )
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[100, 500, 2000])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not args.database_url:
        parser.error("set DATABASE_URL or --database-url")
    logging.basicConfig(level=logging.ERROR)
    for noisy in ("psycopg.pool", "chatgate_server"):  # Postgres away on purpose in one run
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
