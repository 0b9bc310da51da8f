"""The ``chatgate`` command: serve, migrate, simulator."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence

from chatgate_server.config import ConfigError, Settings, database_url_from_env


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatgate", description="gRPC gateway for OpenAI chat completions")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the gRPC server (configured by environment variables; see README)")
    sub.add_parser("migrate", help="apply pending database migrations (DATABASE_URL)")
    sub.add_parser("simulator", help="run the OpenAI-compatible simulator", add_help=False)
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "simulator":
            from chatgate_server.simulator.cli import main as simulator_main

            return simulator_main(rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "migrate":
            return _migrate()
        return _serve()
    except ConfigError as exc:
        print(f"chatgate: configuration error: {exc}", file=sys.stderr)
        return 2


def _migrate() -> int:
    from chatgate_server.usage.migrate import apply_migrations

    url = database_url_from_env()
    try:
        applied = apply_migrations(url)
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback
        print(f"chatgate: migrate failed: {type(exc).__name__}: {_first_line(exc)}", file=sys.stderr)
        return 1
    print(f"applied {len(applied)} migration(s){': ' + ', '.join(applied) if applied else ''}")
    return 0


def _serve() -> int:
    settings = Settings.from_env()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # httpx logs every request at INFO: noise on the hot path, and a URL per line.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_serve_async(settings))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed: grpc.aio and httpx both run faster on it."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return None
    return uvloop.new_event_loop


async def _serve_async(settings: Settings) -> int:
    from chatgate_server.app import App, StartupError

    app = App(settings)
    try:
        await app.start()
    except StartupError as exc:
        print(f"chatgate: {exc}", file=sys.stderr)
        return 1
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        # The first signal drains with the grace period; a second one cuts at once.
        (hurry if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()
    log = logging.getLogger(__name__)
    log.info("shutting down: draining for up to %.1fs (signal again to cut now)", settings.shutdown_grace_s)
    await app.stop(hurry=hurry)
    log.info("stopped")
    return 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


if __name__ == "__main__":
    raise SystemExit(main())
