"""Command line: ``chatgate simulator --host H --port P [--chunks N --delay-ms N --any-model]``
``[--flavor azure --deployment NAME=MODEL --api-version V] [--key-env NAME=VAR]``
``[--scenario SPEC] [--limit-requests N --limit-tokens N --ratelimit-window S]``
(also ``python -m chatgate_server.simulator``). ``--help`` lists every scenario key.

Prints one line, ``chatgate simulator listening on http://H:P/v1`` (in the Azure
flavor, the resource endpoint ``http://H:P``; the URL is the last word), and serves
until SIGINT or SIGTERM, then exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import textwrap
from collections.abc import Coroutine
from typing import Any

from .flavor import FLAVORS
from .models import CONTEXT_WINDOWS
from .ratelimit import DEFAULT_LIMIT_REQUESTS, DEFAULT_LIMIT_TOKENS, DEFAULT_WINDOW_S
from .scenario import ScenarioError, scenario_keys_help
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

azure (--flavor azure):
  POST /openai/deployments/NAME/chat/completions?api-version=V and
  POST /openai/v1/chat/completions (model = deployment); key in the api-key header
  (a bearer token alone is refused); Azure's error bodies, the prompt_filter_results
  chunk first, content_filter_results on content chunks; x-ratelimit-remaining-*.

rate limits:
  every response reports the budget (OpenAI: x-ratelimit-limit/remaining/reset-
  requests|tokens); each request spends 1 request and prompt + max tokens; when it
  cannot pay, 429 rate_limit_exceeded with retry-after. Script it with --limit-*
  and --ratelimit-window, or POST /_simulator/ratelimit {{"remaining_requests": N}}.

endpoints: POST /v1/chat/completions, GET /health, GET /_simulator/stats,
  POST /_simulator/reset, GET|POST /_simulator/ratelimit, GET|POST /_simulator/scenario.
  Details: docs/SIMULATOR.md.
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
    parser.add_argument(
        "--flavor", choices=FLAVORS, default="openai", help="play api.openai.com or Azure OpenAI"
    )
    parser.add_argument(
        "--deployment",
        action="append",
        metavar="NAME=MODEL",
        help="azure: a deployment and the model it serves (repeat; default: every model under its own name)",
    )
    parser.add_argument(
        "--api-version",
        action="append",
        metavar="V",
        help="azure: an api-version served (repeat; default: Azure's)",
    )
    parser.add_argument(
        "--key-env",
        action="append",
        metavar="NAME=VAR",
        help="accept only these keys, read from environment variable VAR; records show NAME (repeat)",
    )
    parser.add_argument("--scenario", default="", metavar="SPEC", help="a scenario every request gets")
    parser.add_argument(
        "--limit-requests",
        type=int,
        default=DEFAULT_LIMIT_REQUESTS,
        help="rate-limit budget: requests per window",
    )
    parser.add_argument(
        "--limit-tokens", type=int, default=DEFAULT_LIMIT_TOKENS, help="rate-limit budget: tokens per window"
    )
    parser.add_argument(
        "--ratelimit-window",
        type=float,
        default=DEFAULT_WINDOW_S,
        metavar="S",
        help="seconds for the budget to refill from empty (default 60)",
    )
    return parser


async def serve(args: argparse.Namespace) -> None:
    """Run the simulator until SIGINT/SIGTERM."""
    simulator = make_simulator(args)
    await simulator.start(args.host, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    url = simulator.azure_endpoint if simulator.flavor == "azure" else simulator.base_url
    print(f"chatgate simulator listening on {url}", flush=True)
    try:
        await stop.wait()
    finally:
        await simulator.stop()


def make_simulator(args: argparse.Namespace) -> Simulator:
    """The simulator the options describe. Raises ValueError (or ScenarioError) for a bad one."""
    keys = {}
    for name, var in _pairs(args.key_env, "--key-env"):
        if not os.environ.get(var):
            raise ValueError(f"--key-env {name}={var}: environment variable {var} is not set")
        keys[name] = os.environ[var]
    return Simulator(
        chunks=args.chunks,
        delay_ms=args.delay_ms,
        record_limit=args.record_limit,
        any_model=args.any_model,
        flavor=args.flavor,
        deployments=dict(_pairs(args.deployment, "--deployment")) if args.deployment else None,
        api_versions=args.api_version,
        keys=keys or None,
        scenario=args.scenario,
        limit_requests=args.limit_requests,
        limit_tokens=args.limit_tokens,
        window_s=args.ratelimit_window,
    )


def _pairs(items: list[str] | None, option: str) -> list[tuple[str, str]]:
    pairs = []
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{option} {item!r}: expected NAME=VALUE")
        pairs.append((name, value))
    return pairs


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
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        make_simulator(args)  # refuse bad options before binding anything
    except (ValueError, ScenarioError) as error:
        parser.error(str(error))
    try:
        _run(serve(args))
    except OSError as error:
        print(f"chatgate simulator: {error}", file=sys.stderr)
        return 1
    return 0
