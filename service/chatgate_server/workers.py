"""``chatgate serve --workers N``: N serving processes on one port, sharing nothing but Postgres.

One grpc.aio process uses one core (one event loop, one GIL), so using every core
takes several processes. Each child is exactly ``chatgate serve --workers 1``: the
single-process server, with its own upstream pool, breaker, ledger writer and health
service. They all bind the same address with ``SO_REUSEPORT``, so the kernel spreads
incoming connections across them.

Only the workers of one supervisor may share the port. A single server binds without
``SO_REUSEPORT`` (so it fails with "address already in use" on a port that is taken);
the supervisor first checks that the port is free with a plain bind, then holds it
with a bound, never listening, ``SO_REUSEPORT`` socket while its workers run: a second
supervisor's check, or a single server, then finds the port in use, while this
supervisor's workers (same user, ``SO_REUSEPORT``) may join it. A bound socket that
does not listen takes no connections.

Why child *processes started afresh* (subprocess) rather than ``fork`` or
``multiprocessing``: grpc's C core is not fork-safe once initialised, and a spawned
child is the very same code path as a single-process server, so what is tested for
one holds for N. The supervisor itself imports no grpc.

The supervisor:

- checks the configuration and the database once (and applies migrations if
  ``CHATGATE_MIGRATE_ON_START`` is set), so N children neither race on migrations nor
  print the same error N times;
- starts the children in their own process group, so a terminal's Ctrl-C reaches
  only the supervisor, which forwards each SIGTERM/SIGINT exactly once to every child
  (a second signal still means "cut now", as for one process), each SIGHUP (reload
  CHATGATE_CONFIG) without stopping, and SIGUSR1 (``chatgate prestop``: health
  NOT_SERVING, calls still served); children also get
  SIGTERM if the supervisor dies (``PR_SET_PDEATHSIG``);
- exits 0 when every child exited 0 after a signal. A child that exits on its own is
  a failure: the others are stopped and the supervisor exits non-zero, leaving the
  restart to whatever runs chatgate (systemd, Kubernetes), which sees one unit.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from types import FrameType

from chatgate_server import early_signals
from chatgate_server.config import ConfigError, Settings

log = logging.getLogger(__name__)

WORKERS_ENV = "CHATGATE_WORKERS"
# Set by the supervisor in its workers' environment (not a setting): share the port.
SUPERVISED_ENV = "CHATGATE_SUPERVISED_WORKER"
_PR_SET_PDEATHSIG = 1


def available_cores() -> int:
    """Cores this process may run on (honours taskset and cgroup cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def resolve_workers(flag: int | None, settings: Settings, env: Mapping[str, str] | None = None) -> int:
    """How many processes to run: ``--workers``, else CHATGATE_WORKERS, else one per core.

    A listen port of 0 means "any free port", which N processes cannot share: it is
    an error with an explicit count above 1, and means one worker by default.
    """
    e = os.environ if env is None else env
    explicit = flag
    if explicit is None and e.get(WORKERS_ENV, "").strip():
        raw = e[WORKERS_ENV].strip()
        if not raw.isdigit() or int(raw) < 1:
            raise ConfigError(f"{WORKERS_ENV} must be a whole number of at least 1, got {raw!r}")
        explicit = int(raw)
    if explicit is not None and explicit < 1:
        raise ConfigError(f"--workers must be at least 1, got {explicit}")
    if settings.listen.port == 0:
        if explicit is not None and explicit > 1:
            raise ConfigError("CHATGATE_LISTEN port 0 (any free port) cannot be shared by several workers")
        return 1
    count = explicit if explicit is not None else available_cores()
    if count > 1 and settings.health_listen is not None and settings.health_listen.port == 0:
        raise ConfigError("CHATGATE_HEALTH_LISTEN port 0 (any free port) cannot be shared by several workers")
    return count


def supervise(settings: Settings, workers: int) -> int:
    """Run ``workers`` children until they have all exited; return the exit code."""
    error = _preflight(settings)
    if error is not None:
        print(f"chatgate: {error}", file=sys.stderr)
        return 1
    holds: list[socket.socket] = []
    ports = [(settings.listen, "CHATGATE_LISTEN")]
    if settings.health_listen is not None:
        ports.append((settings.health_listen, "CHATGATE_HEALTH_LISTEN"))
    try:
        for address, name in ports:
            try:
                holds.append(claim_port(address.host, address.port))
            except OSError as exc:
                print(f"chatgate: cannot listen on {address}: {exc.strerror} ({name})", file=sys.stderr)
                return 1
        return _run(settings, workers)
    finally:
        for hold in holds:
            hold.close()


def _run(settings: Settings, workers: int) -> int:
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)  # forwarded by the loop below, never lost to a race

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, on_signal)
    if early_signals.prestop_noted():  # before these handlers (cli.main noted it)
        received.append(signal.SIGUSR1)
    if early_signals.reload_noted():
        received.append(signal.SIGHUP)
    # Migrations are done (or checked) above; N children must not race on them.
    env = {**os.environ, "CHATGATE_MIGRATE_ON_START": "false", SUPERVISED_ENV: str(os.getpid())}
    children = [_spawn(env) for _ in range(workers)]
    log.info("chatgate supervisor: %d workers on %s (pids %s)", workers, settings.listen, _pids(children))
    return _wait(children, received)


def supervised(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is a worker of a supervisor (and so shares its port)."""
    return bool((os.environ if env is None else env).get(SUPERVISED_ENV))


def claim_port(host: str, port: int) -> socket.socket:
    """A socket that holds ``host:port`` for this supervisor's workers, or OSError
    (EADDRINUSE) when anything else has it. See the module docstring."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.bind(address)  # no SO_REUSEPORT: fails if any socket has the port
    hold = socket.socket(family, kind, proto)
    try:
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        hold.bind(address)
    except OSError:
        hold.close()
        raise
    return hold


def _wait(children: list[subprocess.Popen[bytes]], received: list[int]) -> int:
    stopping = False
    failure: int | None = None
    forwarded = 0
    while True:
        while forwarded < len(received):
            signum = received[forwarded]
            if signum == signal.SIGUSR1:  # prestop: every worker turns NOT_SERVING, none stops
                log.info("chatgate supervisor: prestop; forwarding to every worker")
            elif signum != signal.SIGHUP:  # SIGHUP reloads the deployments; others stop
                stopping = True
            _signal_all(children, signum)
            forwarded += 1
        running = [c for c in children if c.poll() is None]
        if not stopping:
            for child in children:
                if child.returncode is not None:
                    log.error(
                        "worker %d exited on its own (code %s); stopping the others",
                        child.pid,
                        child.returncode,
                    )
                    failure = _code(child.returncode) or 1
                    stopping = True
                    _signal_all(children, signal.SIGTERM)
                    break
        if not running:
            break
        time.sleep(0.05)
    if failure is not None:
        return failure
    codes = [_code(c.returncode) for c in children]
    return next((code for code in codes if code != 0), 0)


def _signal_all(children: list[subprocess.Popen[bytes]], signum: int) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signum)


def _code(returncode: int | None) -> int:
    if returncode is None or returncode < 0:  # killed by a signal
        return 1
    return returncode


def _pids(children: list[subprocess.Popen[bytes]]) -> str:
    return ", ".join(str(c.pid) for c in children)


def _spawn(env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    parent = os.getpid()

    def die_with_parent() -> None:
        early_signals.blocked_in_child()  # a prestop or reload forwarded while it starts waits for it
        if sys.platform == "linux":
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # the supervisor died before prctl took effect
                os._exit(1)

    return subprocess.Popen(
        [sys.executable, "-m", "chatgate_server", "serve", "--workers", "1"],
        env=dict(env),
        process_group=0,
        preexec_fn=die_with_parent,  # the supervisor has no threads yet, so this is safe
    )


def _preflight(settings: Settings) -> str | None:
    """The database checks every worker would make, once, worded as App.start words them.

    A Postgres that is away (rather than misconfigured) is not an error: each worker
    then serves and spools its usage rows, as a single process does.
    """
    from chatgate_server.usage.dberrors import describe
    from chatgate_server.usage.migrate import apply_migrations, database_unreachable, pending_migrations

    try:
        if settings.migrate_on_start:
            applied = apply_migrations(settings.database_url)
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
        pending = pending_migrations(settings.database_url)
    except Exception as exc:  # noqa: BLE001 - any failure here means: no database
        if database_unreachable(exc):
            return None
        return f"cannot use the database at DATABASE_URL: {describe(exc, settings.database_url)}"
    if pending:
        return (
            f"the database at DATABASE_URL lacks migrations {', '.join(pending)}: "
            "run `chatgate migrate` (or set CHATGATE_MIGRATE_ON_START=true)"
        )
    return None
