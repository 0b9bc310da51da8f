"""Command line: ``chatgate simulator --host H --port P [--chunks N --delay-ms N --any-model]``
(also ``python -m chatgate_server.simulator``). ``--help`` lists every scenario key.

Prints one line, ``chatgate simulator listening on http://H:P/v1`` (the URL is the last
word), and serves until SIGINT or SIGTERM, then exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import textwrap
from collections.abc import Coroutine
from typing import Any

from .models import CONTEXT_WINDOWS
from .scenario import scenario_keys_help
from .server import DEFAULT_CHUNKS, Simulator

PROG = "chatgate simulator"


def epilog() -> str:
    """Scenarios, models and answers: what a test needs to know to drive the simulator."""
    models = ", ".join(f"{name}:{window}" for name, window in CONTEXT_WINDOWS.items())
    return f"""\
scenarios:
  Chosen per request by a model-name suffix (gpt-4o-mini::status=500,times=2) and/or
  the x-simulator-scenario header: comma-separated KEY=VALUE items and bare flags. An
  unknown key or bad value is a 400. Keys marked (outcome) cannot be combined.
{scenario_keys_help()}

models (context window in tokens; dated snapshots such as gpt-4o-mini-2024-07-18 too):
  {textwrap.fill(models, 86, subsequent_indent="  ", break_on_hyphens=False)}
  Another name gets 404 model_not_found (unless --any-model); a prompt that does not
  fit the window with max_completion_tokens gets 400 context_length_exceeded.

answers:
  tool calls when tools are offered, but text once the last message is a tool result
  (unless tool_choice is "required" or a named function); JSON fitting the schema for
  response_format json_schema, {{"answer": ...}} for json_object; text otherwise.

endpoints: POST /v1/chat/completions, GET /health, GET /_simulator/stats,
  POST /_simulator/reset. Details: docs/SIMULATOR.md.
"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The argument parser (``chatgate simulator``; ``python -m`` passes its own prog)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="An OpenAI-compatible chat-completions server with fault scenarios, for tests.",
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    parser.add_argument(
        "--any-model", action="store_true", help="serve any model name, not only the list below"
    )
    return parser


async def serve(args: argparse.Namespace) -> None:
    """Run the simulator until SIGINT/SIGTERM."""
    simulator = Simulator(
        chunks=args.chunks, delay_ms=args.delay_ms, record_limit=args.record_limit, any_model=args.any_model
    )
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


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Entry point; returns the exit code."""
    args = build_parser(prog).parse_args(argv)
    try:
        _run(serve(args))
    except OSError as error:
        print(f"chatgate simulator: {error}", file=sys.stderr)
        return 1
    return 0
