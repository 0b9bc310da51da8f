"""Command line: ``python -m chatgate_server.simulator --host H --port P [--chunks N --delay-ms N]``.

Prints one line, ``chatgate simulator listening on http://H:P/v1`` (the URL is the last
word), and serves until SIGINT or SIGTERM, then exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from .server import DEFAULT_CHUNKS, Simulator


def build_parser(prog: str = "python -m chatgate_server.simulator") -> argparse.ArgumentParser:
    """The argument parser (also used by the ``chatgate simulator`` subcommand)."""
    parser = argparse.ArgumentParser(
        prog=prog, description="OpenAI-compatible simulator with fault scenarios"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=8000, help="port to bind; 0 picks a free one (default 8000)"
    )
    parser.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS, help="default content chunks per reply")
    parser.add_argument("--delay-ms", type=int, default=0, help="default delay before each chunk, ms")
    parser.add_argument(
        "--record-limit", type=int, default=100_000, help="request records kept for /_simulator/stats"
    )
    return parser


async def serve(args: argparse.Namespace) -> None:
    """Run the simulator until SIGINT/SIGTERM."""
    simulator = Simulator(chunks=args.chunks, delay_ms=args.delay_ms, record_limit=args.record_limit)
    await simulator.start(args.host, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"chatgate simulator listening on {simulator.base_url}", flush=True)
    try:
        await stop.wait()
    finally:
        await simulator.stop()


def _run(coro: Coroutine[Any, Any, None]) -> None:
    # uvloop when present: the simulator must not be the bottleneck of a benchmark.
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        _run(serve(args))
    except OSError as error:
        print(f"chatgate simulator: {error}", file=sys.stderr)
        return 1
    return 0
