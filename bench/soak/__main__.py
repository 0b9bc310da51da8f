"""Run the chaos soak: ``python -m bench.soak --seconds 600 [--callers 50]``.

The timeline, as fractions of ``--seconds``: fault bursts of 3 s in every 12 s
throughout; Postgres cut at 25 % for min(30 s, 15 %); one SIGTERM at 50 %; at 75 %
Postgres hangs (accepts, never answers) and, a few seconds later, chatgate gets a
kill -9; each end is followed by a restart on the same spool; then the callers stop,
the simulator is stopped (chatgate must close its side of every upstream connection),
and chatgate gets its final SIGTERM before the audit. Prints the figures as JSON and
exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

from bench.soak import audit
from bench.soak.traffic import Traffic
from bench.soak.world import (
    Chatgate,
    HealthProbe,
    MemoryWatch,
    Simulator,
    migrate,
    upstream_connections,
)
from tests.databases import throwaway_database
from tests.integration.pgproxy import PgProxy

BURST_EVERY_S = 12.0
BURST_FOR_S = 3.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="length of the load phase")
    parser.add_argument("--callers", type=int, default=50, help="concurrent callers")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""))
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser.parse_args(argv)


async def at(t0: float, offset_s: float, stop: asyncio.Event) -> bool:
    """Sleep until ``t0 + offset_s``; False if ``stop`` came first."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(0.0, t0 + offset_s - time.monotonic()))
    return not stop.is_set()


async def bursts(traffic: Traffic, stop: asyncio.Event) -> None:
    while not stop.is_set():
        traffic.in_burst = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), BURST_EVERY_S - BURST_FOR_S)
        traffic.in_burst = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), BURST_FOR_S)
    traffic.in_burst = False


async def restart(chatgate: Chatgate, probe: HealthProbe, end: Callable[[], Awaitable[object]]) -> float:
    """End chatgate with ``end``, start it again, and return when it serves again."""
    probe.paused = True
    await end()
    chatgate.start()
    await chatgate.wait_serving()
    probe.paused = False
    return time.time()


async def timeline(
    seconds: float, chatgate: Chatgate, proxy: PgProxy, probe: HealthProbe, stop: asyncio.Event
) -> audit.Timeline:
    events = audit.Timeline()
    t0 = time.monotonic()
    outage = min(30.0, 0.15 * seconds)
    if await at(t0, 0.25 * seconds, stop):
        proxy.cut()
        cut_at = time.time()
        await at(t0, 0.25 * seconds + outage, stop)
        proxy.restore()
        events.postgres_cut = (cut_at, time.time())
    if await at(t0, 0.5 * seconds, stop):
        events.sigterm_at = time.time()

        async def terminate() -> None:
            events.sigterm_exit_code = await chatgate.terminate()

        await restart(chatgate, probe, terminate)
    if await at(t0, 0.75 * seconds, stop):
        # kill -9 while Postgres hangs (accepts, never answers): the worst moment, with
        # rows waiting on a write that will never return.
        proxy.hang()
        await at(time.monotonic(), min(3.0, 0.05 * seconds), stop)
        events.kill_at = time.time()

        async def kill_then_answer() -> None:
            await chatgate.kill()
            proxy.restore()

        events.kill_restarted_at = await restart(chatgate, probe, kill_then_answer)
    await at(t0, seconds, stop)
    return events


async def wait_upstream_closed(port: int, timeout_s: float) -> tuple[dict[str, int], float]:
    """chatgate's open sockets to the (stopped) upstream, and how long they took to go."""
    started = time.monotonic()
    while True:
        counts = upstream_connections(port)
        open_now = {s: n for s, n in counts.items() if s in ("ESTABLISHED", "CLOSE_WAIT")}
        waited = time.monotonic() - started
        if not open_now or waited > timeout_s:
            return open_now, waited
        await asyncio.sleep(0.25)


async def soak(args: argparse.Namespace, workdir: Path, database_url: str) -> audit.Report:
    report = audit.Report()
    secret = "sk-soak-" + secrets.token_hex(24)
    migrate(database_url)
    proxy = PgProxy(*_host_port(database_url))
    await proxy.start()
    simulator = Simulator(workdir / "simulator.log")
    chatgate = Chatgate(
        env={
            **os.environ,
            "OPENAI_API_KEY": secret,
            "OPENAI_BASE_URL": simulator.base_url,
            "DATABASE_URL": proxy.url_for(database_url),
            "CHATGATE_SPOOL_DIR": str(workdir / "spool"),
            "CHATGATE_SHUTDOWN_GRACE_SECONDS": "5",
            "CHATGATE_BREAKER_COOLDOWN_SECONDS": "2",
            "CHATGATE_BREAKER_MAX_COOLDOWN_SECONDS": "4",
            "CHATGATE_LOG_FORMAT": "json",
            # The soak audits rows and outcomes through database chaos; a restart while
            # Postgres hangs would find no callers and refuse everything (fail closed).
            "CHATGATE_AUTH": "off",
        },
        log=workdir / "chatgate.log",
    )
    chatgate.start()
    try:
        await chatgate.wait_serving()
        traffic = Traffic(chatgate.target, args.callers, seed=args.seed)
        probe = HealthProbe(chatgate.target)
        memory = MemoryWatch(chatgate)
        stop_load, stop_watch = asyncio.Event(), asyncio.Event()
        watchers = [asyncio.create_task(w.run(stop_watch)) for w in (probe, memory)]
        load = [asyncio.create_task(traffic.run(stop_load)), asyncio.create_task(bursts(traffic, stop_load))]
        events = await timeline(args.seconds, chatgate, proxy, probe, stop_load)
        stop_load.set()
        await asyncio.gather(*load)
        stop_watch.set()
        await asyncio.gather(*watchers)

        simulator.stop()
        still_open, waited = await wait_upstream_closed(simulator.port, 15.0)
        report.figures["upstream_sockets_after_load"] = still_open
        report.figures["upstream_sockets_closed_after_s"] = round(waited, 1)
        report.check(not still_open, f"upstream sockets still open after load: {still_open}")

        final_code = await chatgate.terminate()
        report.check(final_code == 0, f"the final SIGTERM exited {final_code}")
        report.check(events.sigterm_exit_code == 0, f"the mid-run SIGTERM exited {events.sigterm_exit_code}")
        report.figures["restarts"] = chatgate.starts - 1
        audit.audit_calls(traffic.records, audit.rows_by_request(database_url), events, report)
        audit.audit_health(probe.latencies_ms, probe.failures, report)
        audit.audit_memory(memory.readings_mb, report)
        hits = audit.secret_hits(database_url, [workdir / "chatgate.log"], secret)
        report.figures["secret_hits"] = len(hits)
        report.check(not hits, f"the OpenAI key appeared in: {hits}")
    finally:
        if chatgate.popen is not None and chatgate.popen.poll() is None:
            await chatgate.kill()
        simulator.stop()
        await proxy.stop()
    return report


def _host_port(database_url: str) -> tuple[str, int]:
    params = conninfo_to_dict(database_url)
    return str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.database_url:
        print("set DATABASE_URL (or --database-url): the soak needs a Postgres server", file=sys.stderr)
        return 2
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="chatgate-soak-") as tmp,
        throwaway_database(args.database_url, "chatgate_soak") as url,
    ):
        report = asyncio.run(soak(args, Path(tmp), url))
        if report.failures:
            # Keep the logs of a failed run where the reader can find them.
            kept = Path(tempfile.mkdtemp(prefix="chatgate-soak-failed-"))
            for log in Path(tmp).glob("*.log"):
                (kept / log.name).write_bytes(log.read_bytes())
            report.figures["logs"] = str(kept)
    report.figures["wall_s"] = round(time.monotonic() - started, 1)
    output = {"figures": report.figures, "failures": report.failures}
    text = json.dumps(output, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
