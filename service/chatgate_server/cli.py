"""The ``chatgate`` command: serve, migrate, simulator, and the operators' commands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence

from chatgate_server.auth.commands import CALLERS_COMMAND, add_callers_command, run_callers_command
from chatgate_server.config import ConfigError, Settings, database_url_from_env
from chatgate_server.limits.commands import LIMITS_COMMAND, add_limits_command, run_limits_command
from chatgate_server.logs import configure_logging
from chatgate_server.usage.commands import USAGE_COMMANDS, add_usage_commands, run_usage_command


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatgate", description="gRPC gateway for OpenAI chat completions")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC server (configured by environment variables)")
    serve.add_argument(
        "--workers",
        type=int,
        default=None,
        help="server processes sharing the port (default: $CHATGATE_WORKERS, else one per core)",
    )
    sub.add_parser("migrate", help="apply pending database migrations (DATABASE_URL)")
    sub.add_parser("simulator", help="run the OpenAI-compatible simulator", add_help=False)
    health = sub.add_parser(
        "health", help="exit 0 when a chatgate server reports SERVING (for container health checks)"
    )
    health.add_argument("--address", default="127.0.0.1:50051", help="host:port of the server")
    health.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each answer")
    health.add_argument(
        "--ledger",
        action="store_true",
        help="also require the usage ledger (health service chatgate.ledger) to be SERVING, "
        "i.e. usage rows reach Postgres rather than wait in the spool",
    )
    add_usage_commands(sub)
    add_callers_command(sub)
    add_limits_command(sub)
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "simulator":
            from chatgate_server.simulator.cli import main as simulator_main

            return simulator_main(rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "migrate":
            return _migrate()
        if args.command == "health":
            return _health(args.address, args.timeout, ledger=args.ledger)
        if args.command == CALLERS_COMMAND:
            return run_callers_command(args)
        if args.command == LIMITS_COMMAND:
            return run_limits_command(args)
        if args.command in USAGE_COMMANDS:
            return run_usage_command(args)
        return _serve(args.workers)
    except ConfigError as exc:
        print(f"chatgate: configuration error: {exc}", file=sys.stderr)
        return 2


def _migrate() -> int:
    from chatgate_server.usage.dberrors import describe
    from chatgate_server.usage.migrate import apply_migrations

    url = database_url_from_env()
    try:
        applied = apply_migrations(url)
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback
        # The cause (host, database, user and libpq's reason) in one line; never the password.
        print(f"chatgate: migrate failed: {describe(exc, url)}", file=sys.stderr)
        return 1
    print(f"applied {len(applied)} migration(s){': ' + ', '.join(applied) if applied else ''}")
    return 0


def _serve(workers: int | None = None) -> int:
    settings = Settings.from_env()
    configure_logging(settings.log_level, json_lines=settings.log_format == "json")
    from chatgate_server.workers import resolve_workers, supervise

    count = resolve_workers(workers, settings)
    if count > 1:
        return supervise(settings, count)  # N children, each this function with --workers 1
    from chatgate_server.memory import keep_large_allocations_unpooled
    from chatgate_server.workers import supervised

    keep_large_allocations_unpooled()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_serve_async(settings, reuse_port=supervised()))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed: grpc.aio and httpx both run faster on it."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return None
    return uvloop.new_event_loop


async def _serve_async(settings: Settings, *, reuse_port: bool = False) -> int:
    from chatgate_server.app import App, StartupError

    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        # The first signal drains with the grace period; a second one cuts at once.
        (hurry if stop.is_set() else stop).set()

    # Handlers first: a signal that arrives while start-up is still under way (a worker
    # starting while its supervisor already forwards SIGTERM) must stop us cleanly, not
    # kill us with the default action.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    app = App(settings, reuse_port=reuse_port)
    try:
        await app.start()
    except StartupError as exc:
        print(f"chatgate: {exc}", file=sys.stderr)
        return 1
    await stop.wait()
    log = logging.getLogger(__name__)
    log.info("shutting down: draining for up to %.1fs (signal again to cut now)", settings.shutdown_grace_s)
    await app.stop(hurry=hurry)
    # From here the process only exits. Ignore further signals rather than let the
    # default action kill it once the loop drops its handlers: a supervisor forwarding
    # a second SIGTERM would otherwise see this clean exit as "killed by SIGTERM".
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    log.info("stopped")
    return 0


def _health(address: str, timeout: float, *, ledger: bool = False) -> int:
    from chatgate_server.rpc.health_probe import LEDGER_HEALTH_SERVICE, probe

    answers = probe(address, ("", LEDGER_HEALTH_SERVICE) if ledger else ("",), timeout)
    healthy = True
    for service, status in answers:
        print(f"{service}: {status}" if service else status)
        healthy = healthy and status == "SERVING"
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
