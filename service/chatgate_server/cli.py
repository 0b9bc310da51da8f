"""The ``chatgate`` command: serve, migrate, simulator, config check, and the operator commands."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from chatgate_server.auth.commands import CALLERS_COMMAND, add_callers_command, run_callers_command
from chatgate_server.config import ConfigError, Settings, database_url_from_env
from chatgate_server.limits.anomaly_commands import (
    ANOMALY_COMMANDS,
    add_anomaly_commands,
    add_usage_anomalies,
    run_anomaly_command,
    wants_usage_anomalies,
)
from chatgate_server.limits.blocks_commands import BLOCK_COMMANDS, add_block_commands, run_block_command
from chatgate_server.limits.commands import LIMITS_COMMAND, add_limits_command, run_limits_command
from chatgate_server.logs import configure_logging
from chatgate_server.usage.commands import USAGE_COMMANDS, add_usage_commands, run_usage_command

if TYPE_CHECKING:
    from chatgate_server.app import App


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
    health.add_argument(
        "--deployments",
        action="store_true",
        help="also print each upstream deployment's status (chatgate.deployment.<name>: NOT_SERVING "
        "while its breaker is open), names from $CHATGATE_CONFIG; informational, the exit status "
        "does not depend on them",
    )
    config = sub.add_parser("config", help="work with the deployments file (chatgate.toml)")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser(
        "check", help="check a deployments file offline: its keys, deployments, routes and key references"
    )
    check.add_argument("file", nargs="?", default=None, help="the file (default: $CHATGATE_CONFIG)")
    prestop = sub.add_parser(
        "prestop",
        help="turn a running server's health NOT_SERVING (SIGUSR1), then wait: a Kubernetes "
        "preStop hook, so balancers stop sending calls before SIGTERM starts the drain",
    )
    prestop.add_argument(
        "--wait-seconds", type=float, default=5.0, help="seconds to wait after signalling (default 5)"
    )
    prestop.add_argument(
        "--pid", type=int, default=1, help="the server's (or supervisor's) process id (default 1)"
    )
    add_usage_commands(sub)
    add_usage_anomalies(sub.choices["usage"])
    add_callers_command(sub)
    add_block_commands(sub)
    add_anomaly_commands(sub)
    add_limits_command(sub)
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        # Before serve's imports: a prestop now must not end the process (early_signals.py).
        from chatgate_server import early_signals

        early_signals.note()
    elif args.command != "simulator":
        # A one-shot command ends with one line saying what went wrong; psycopg_pool's
        # retries would each print a warning before it (logging's last-resort handler).
        logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    try:
        if args.command == "simulator":
            from chatgate_server.simulator.cli import main as simulator_main

            return simulator_main(rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "migrate":
            return _migrate()
        if args.command == "config":
            return _config_check(args.file)
        if args.command == "health":
            return _health(args.address, args.timeout, ledger=args.ledger, deployments=args.deployments)
        if args.command == "prestop":
            return _prestop(args.pid, args.wait_seconds)
        if args.command in _DATABASE_COMMANDS or wants_usage_anomalies(args):
            from chatgate_server.command_deadline import bounded

            with bounded(args.command):
                return _database_command(args)
        return _serve(args.workers)
    except ConfigError as exc:
        print(f"chatgate: configuration error: {exc}", file=sys.stderr)
        return 2


# The one-shot commands that talk to Postgres, each bounded as a whole (command_deadline.py);
# not migrate: a migration of a large table may take long, and its Job has a deadline.
_DATABASE_COMMANDS = frozenset(
    (CALLERS_COMMAND, LIMITS_COMMAND, *BLOCK_COMMANDS, *ANOMALY_COMMANDS, *USAGE_COMMANDS)
)


def _database_command(args: argparse.Namespace) -> int:
    if args.command == CALLERS_COMMAND:
        return run_callers_command(args)
    if args.command in BLOCK_COMMANDS:
        return run_block_command(args)
    if args.command in ANOMALY_COMMANDS or wants_usage_anomalies(args):
        return run_anomaly_command(args)
    if args.command == LIMITS_COMMAND:
        return run_limits_command(args)
    return run_usage_command(args)


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


def _config_check(file: str | None) -> int:
    """Load the file as start-up would (keys read from their references, never shown)
    and say what it routes where; a problem is one line and exit status 2."""
    import os
    from pathlib import Path

    from chatgate_server.deployments import load_config
    from chatgate_server.domain import FEATURES

    path = file or os.environ.get("CHATGATE_CONFIG", "").strip()
    if not path:
        raise ConfigError("name a file, or set CHATGATE_CONFIG")
    config = load_config(Path(path))
    for d in config.deployments:
        models = ", ".join(m if m == u else f"{m} -> {u}" for m, u in d.models.items())
        key = "no key" if d.api_key is None else "key set"
        about = f"{key}; weight {d.weight:g}; models {models}"
        if d.prices_file:
            about += f"; prices {d.prices_file}"
        about += f"; accepts {', '.join(f for f in FEATURES if f in d.accepts) or 'no extra options'}"
        print(f"deployment {d.name}: {d.kind} {d.base_url} ({about})")
    for r in config.routes:
        order = "weighted" if r.weighted else "in order"
        fallback = f", then {r.fallback}" if r.fallback else ""
        print(f"route {r.name}: {r.model} on {', '.join(r.deployments)} ({order}){fallback}")
    print(f"{path}: ok")
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
    from chatgate_server import early_signals
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
    # SIGUSR1 (``chatgate prestop``): health NOT_SERVING, calls still served. Noted even
    # during start-up and applied once serving.
    withdraw = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, withdraw.set)
    if early_signals.prestop_noted():
        withdraw.set()
    app = App(settings, reuse_port=reuse_port)
    reloads: set[asyncio.Task[bool]] = set()
    started = False
    reload_pending = early_signals.reload_noted()

    def on_hangup() -> None:
        # SIGHUP re-reads CHATGATE_CONFIG; a bad file is refused and logged (App.reload).
        # During start-up it is kept for once serving: the file may change after it is read.
        nonlocal reload_pending
        if not started:
            reload_pending = True
            return
        task = loop.create_task(app.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        await app.start()
    except StartupError as exc:
        print(f"chatgate: {exc}", file=sys.stderr)
        return 1
    started = True
    if reload_pending:
        on_hangup()
    withdrawing = asyncio.create_task(_withdraw_on(withdraw, app))
    await stop.wait()
    withdrawing.cancel()
    log = logging.getLogger(__name__)
    log.info("shutting down: draining for up to %.1fs (signal again to cut now)", settings.shutdown_grace_s)
    await app.stop(hurry=hurry)
    # From here the process only exits. Ignore further signals rather than let the
    # default action kill it once the loop drops its handlers: a supervisor forwarding
    # a second SIGTERM would otherwise see this clean exit as "killed by SIGTERM".
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    log.info("stopped")
    return 0


async def _withdraw_on(event: asyncio.Event, app: App) -> None:
    await event.wait()
    await app.withdraw()


def _prestop(pid: int, wait_s: float) -> int:
    """Signal the server to report NOT_SERVING, then wait while the endpoints and the
    clients watching health take it out of rotation; SIGTERM comes after this returns."""
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError as exc:
        print(f"chatgate: prestop: cannot signal process {pid}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"chatgate: prestop: process {pid} reports NOT_SERVING; waiting {wait_s:g}s", file=sys.stderr)
    time.sleep(max(0.0, wait_s))
    return 0


def _health(address: str, timeout: float, *, ledger: bool = False, deployments: bool = False) -> int:
    from chatgate_server.rpc.deployment_health import health_name
    from chatgate_server.rpc.health_probe import LEDGER_HEALTH_SERVICE, probe

    required = ("", LEDGER_HEALTH_SERVICE) if ledger else ("",)
    shown = tuple(health_name(name) for name in _deployment_names()) if deployments else ()
    healthy = True
    for service, status in probe(address, (*required, *shown), timeout):
        print(f"{service}: {status}" if service else status)
        if service in required:
            healthy = healthy and status == "SERVING"
    return 0 if healthy else 1


def _deployment_names() -> list[str]:
    """The deployments a server started with this environment has (keys not read)."""
    from chatgate_server.deployments import ENV_DEPLOYMENT, load_config

    path = os.environ.get("CHATGATE_CONFIG", "").strip()
    if not path:
        return [ENV_DEPLOYMENT]
    return [d.name for d in load_config(Path(path), keys=False).deployments]


if __name__ == "__main__":
    raise SystemExit(main())
