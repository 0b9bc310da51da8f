"""The composition root: opens every resource, wires the parts, closes them in reverse."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2
from psycopg_pool import AsyncConnectionPool

from chatgate_server.admission import AdmissionChain
from chatgate_server.auth.store import CallerStore
from chatgate_server.auth.table import CallerTable
from chatgate_server.completion import CompletionService
from chatgate_server.config import Settings
from chatgate_server.limits.wiring import LimitsRuntime
from chatgate_server.rpc.authn import OFF_WARNING, Authenticator
from chatgate_server.rpc.convert import RequestLimits
from chatgate_server.rpc.edge import Edge, EdgeLimits
from chatgate_server.rpc.ledger_health import LedgerHealth
from chatgate_server.rpc.server import CHAT_SERVICE, build_server
from chatgate_server.rpc.servicer import ChatServicer
from chatgate_server.rpc.tls import ReloadingTls, TlsFiles
from chatgate_server.rpc.usage_servicer import UsageServicer
from chatgate_server.telemetry import Providers, Telemetry, providers_from_env
from chatgate_server.upstream.breaker import CircuitBreaker
from chatgate_server.upstream.openai import OpenAIUpstream
from chatgate_server.upstream.retry import RetryPolicy
from chatgate_server.usage import tokens
from chatgate_server.usage.admission import RequestIdGuard
from chatgate_server.usage.connect import with_connect_timeout
from chatgate_server.usage.dberrors import describe
from chatgate_server.usage.ledger import UsageLedger
from chatgate_server.usage.migrate import apply_migrations, database_unreachable, pending_migrations
from chatgate_server.usage.pricing import PriceFileError, load_prices
from chatgate_server.usage.reports import UsageReports, page_token_key
from chatgate_server.usage.reservations import POOL_KWARGS, ReservationStore, configure
from chatgate_server.usage.spool import Spool, SpoolError
from chatgate_server.usage.store import UsageStore

log = logging.getLogger(__name__)

# How long start-up waits for the first load of the caller table; past it chatgate
# serves anyway and refuses authenticated calls (CALLERS_UNAVAILABLE) until it loads.
CALLERS_LOAD_TIMEOUT_S = 10.0


async def _bounded(what: str, step: Coroutine[Any, Any, object], timeout_s: float) -> None:
    """One shutdown step, bounded: a stop that hangs (a lost completion in a library)
    must not keep the process, and the usage rows behind it, from the next steps."""
    try:
        async with asyncio.timeout(timeout_s):
            await step
    except TimeoutError:
        log.error("shutdown: %s did not stop within %.0fs; going on", what, timeout_s)


class StartupError(Exception):
    """A resource could not be opened; the message says which, without secrets."""


class App:
    """chatgate, assembled. ``await start()``, then ``await stop()``."""

    def __init__(
        self, settings: Settings, telemetry: Telemetry | None = None, *, reuse_port: bool = False
    ) -> None:
        """``telemetry`` defaults to OTLP export configured by the OTEL_* variables;
        ``reuse_port`` shares the port with the other workers of one supervisor."""
        self.settings = settings
        self._reuse_port = reuse_port
        self._providers: Providers | None = None
        if telemetry is None:
            self._providers = providers_from_env()
            telemetry = Telemetry(self._providers.tracer_provider, self._providers.meter_provider)
        self.telemetry = telemetry
        self.port: int | None = None
        self._pool: AsyncConnectionPool | None = None
        self._report_pool: AsyncConnectionPool | None = None
        self._reservation_pool: AsyncConnectionPool | None = None
        self._callers_pool: AsyncConnectionPool | None = None
        self.callers: CallerTable | None = None
        self._guard: RequestIdGuard | None = None
        self._spool: Spool | None = None
        self.ledger_health: LedgerHealth | None = None
        self._upstream: OpenAIUpstream | None = None
        self.ledger: UsageLedger | None = None
        self._server: grpc.aio.Server | None = None
        self.edge: Edge | None = None
        self._health: health.aio.HealthServicer | None = None
        self.breaker: CircuitBreaker | None = None
        self.service: CompletionService | None = None
        self.limits: LimitsRuntime | None = None

    async def start(self) -> int:
        """Open resources and start serving; returns the bound port."""
        s = self.settings
        postgres_ok = True
        try:
            if s.migrate_on_start:
                applied = await asyncio.to_thread(apply_migrations, s.database_url)
                if applied:
                    log.info("applied migrations: %s", ", ".join(applied))
            pending = await asyncio.to_thread(pending_migrations, s.database_url)
        except Exception as exc:  # noqa: BLE001 - any failure here means: no database
            if not database_unreachable(exc):
                await self.stop(0)
                raise StartupError(
                    f"cannot use the database at DATABASE_URL: {describe(exc, s.database_url)}"
                ) from None
            # Away rather than misconfigured: serve, and keep usage rows in the spool until
            # it answers (the next start checks migrations again).
            log.warning(
                "Postgres at DATABASE_URL is unreachable (%s); serving, usage rows go to the spool",
                describe(exc, s.database_url),
            )
            postgres_ok, pending = False, []
        if pending:
            await self.stop(0)
            raise StartupError(
                f"the database at DATABASE_URL lacks migrations {', '.join(pending)}: "
                "run `chatgate migrate` (or set CHATGATE_MIGRATE_ON_START=true)"
            )
        # Estimates happen on cancel paths, where a half-second tokenizer load would
        # hold up the usage row: load it before serving.
        await asyncio.to_thread(tokens.warm_up)
        # Opened in the background: a Postgres that is away must not hold up serving.
        # The pool retries connecting with backoff; capping a retry chain keeps it from
        # sleeping for minutes after a long outage while Postgres is back.
        # A connect timeout on both: a Postgres that accepts TCP and never answers must
        # fail a connection attempt in seconds, not the two minutes psycopg allows.
        url = with_connect_timeout(s.database_url)
        self._pool = AsyncConnectionPool(
            url, min_size=1, max_size=8, open=False, reconnect_timeout=s.ledger_retry_cap_s
        )
        self._report_pool = AsyncConnectionPool(url, min_size=1, max_size=4, open=False)
        # Request-id reservations (usage/reservations.py): a pool of their own, so a burst
        # of ledger batches or reports never makes a call wait for its reservation, and
        # with the settings that make a reservation one cheap round trip.
        self._reservation_pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=4,
            open=False,
            kwargs=POOL_KWARGS,
            configure=configure,
            reconnect_timeout=s.ledger_retry_cap_s,
        )
        await self._pool.open(wait=False)
        await self._report_pool.open(wait=False)
        await self._reservation_pool.open(wait=False)
        self._spool = Spool(s.spool_dir, max_bytes=s.spool_max_bytes)
        try:
            await asyncio.to_thread(self._spool.open)
        except SpoolError as exc:
            self._spool = None
            await self.stop(0)
            raise StartupError(f"{exc} (CHATGATE_SPOOL_DIR)") from None
        window = timedelta(hours=s.request_id_window_h)
        store = UsageStore(self._pool, attempt_window=window)
        self._guard = RequestIdGuard(ReservationStore(self._reservation_pool, window=window), window=window)
        self.ledger = UsageLedger(
            store,
            self._spool,
            queue_size=s.ledger_queue_size,
            batch_size=s.ledger_batch_size,
            write_timeout_s=s.ledger_write_timeout_s,
            spool_after_s=s.ledger_spool_after_s,
            retry_cap_s=s.ledger_retry_cap_s,
            postgres_ok=postgres_ok,
            tracer=self.telemetry.tracer,
        )
        self.ledger.start()
        self._upstream = OpenAIUpstream(
            s.openai_base_url,
            s.openai_api_key,
            connect_timeout=s.upstream_connect_timeout_s,
            max_connections=s.upstream_max_connections,
            coalesce_deltas=s.coalesce_deltas,
        )
        self.breaker = CircuitBreaker(
            self._upstream.name,
            failure_threshold=s.breaker_failure_threshold,
            window_s=s.breaker_window_s,
            failure_rate=s.breaker_failure_rate,
            cooldown_s=s.breaker_cooldown_s,
            max_cooldown_s=s.breaker_max_cooldown_s,
        )
        try:
            prices = load_prices(s.prices_file)
        except PriceFileError as exc:  # checked with the settings; changed since?
            await self.stop(0)
            raise StartupError(f"CHATGATE_PRICES_FILE: {exc}") from None
        self.limits = LimitsRuntime(url, s, prices)
        await self.limits.start(postgres_ok)
        self.service = service = CompletionService(
            self._upstream,
            self.ledger,
            tokens.TiktokenEstimator(),
            breaker=self.breaker,
            retry_policy=RetryPolicy(
                max_attempts=s.retry_max_attempts, base_s=s.retry_base_s, cap_s=s.retry_cap_s
            ),
            first_byte_timeout_s=s.upstream_first_byte_timeout_s,
            telemetry=self.telemetry,
            # Preconditions' refusals leave no usage row; policies' leave one (admission.py).
            admission=AdmissionChain(
                preconditions=(self.ledger, self._guard), policies=(self.limits.policy,)
            ),
            prices=prices,
        )
        self._observe()
        authenticator = await self._authenticator(postgres_ok)
        chat = ChatServicer(
            service,
            deadline_cap_s=s.deadline_cap_s,
            limits=RequestLimits(max_request_bytes=s.max_request_bytes, allowed_models=s.allowed_models),
        )
        self.edge = Edge(
            EdgeLimits(
                max_request_bytes=s.max_request_bytes,
                max_concurrent_streams=s.max_concurrent_streams,
                max_request_bytes_in_flight=s.max_request_bytes_in_flight,
                max_health_watches=s.max_health_watches,
                max_health_watches_per_connection=s.max_health_watches_per_connection,
            ),
            self.telemetry,
            authenticator,
        )
        self._server, self._health = build_server(
            chat,
            edge=self.edge,
            usage=UsageServicer(
                UsageReports(self._report_pool), page_token_key=page_token_key(s.openai_api_key.value)
            ),
            reuse_port=self._reuse_port,
            reflection=s.reflection,
        )
        try:
            self.port = self._listen(self._server)
        except StartupError:
            await self.stop(0)
            raise
        await self._server.start()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(CHAT_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self.ledger_health = LedgerHealth(self._health, ("", CHAT_SERVICE))
        self.ledger.add_listener(self.ledger_health)
        self.ledger_health(self.ledger.state)
        log.info(
            "chatgate serving on %s:%d (%s, authentication %s), upstream %s",
            s.listen.host,
            self.port,
            "mTLS" if s.tls_client_ca_file else "TLS" if s.tls else "plaintext",
            s.auth,
            s.openai_base_url,
        )
        return self.port

    async def _authenticator(self, postgres_ok: bool) -> Authenticator:
        """Who may call: the caller table (its own small pool, so a burst of usage writes
        never holds up a reload), loaded before serving, or nobody checked at all."""
        s = self.settings
        if s.auth == "off":
            log.warning(OFF_WARNING)
            return Authenticator(None, telemetry=self.telemetry)
        self._callers_pool = AsyncConnectionPool(
            s.database_url,
            min_size=1,
            max_size=2,
            open=False,
            timeout=5,
            reconnect_timeout=s.ledger_retry_cap_s,
        )
        await self._callers_pool.open(wait=False)
        self.callers = CallerTable(CallerStore(self._callers_pool))
        # A Postgres already known to be away is not waited for long.
        await self.callers.start(CALLERS_LOAD_TIMEOUT_S if postgres_ok else 1.0)
        return Authenticator(
            self.callers, certificates=s.tls_client_ca_file is not None, telemetry=self.telemetry
        )

    def _listen(self, server: grpc.aio.Server) -> int:
        s = self.settings
        listen = s.listen
        try:
            if s.tls_cert_file is not None and s.tls_key_file is not None:
                tls = ReloadingTls(TlsFiles(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file))
                port = server.add_secure_port(str(listen), tls.credentials())
            else:
                port = server.add_insecure_port(str(listen))
        except RuntimeError:  # grpc >= 1.5x raises where older versions returned 0
            port = 0
        if port == 0:
            # Without SO_REUSEPORT (a single server), a port in use fails here.
            raise StartupError(
                f"cannot listen on {listen}: address already in use or not available (CHATGATE_LISTEN)"
            )
        return port

    async def stop(self, grace: float | None = None, hurry: asyncio.Event | None = None) -> None:
        """Drain and close, in reverse order of opening.

        Health turns NOT_SERVING and new calls are refused at once; running calls get
        ``grace`` seconds (the configured grace when None; less when ``hurry`` is set)
        and are then cut with their final event and usage row; the ledger is flushed.
        """
        grace = self.settings.shutdown_grace_s if grace is None else grace
        if self._health is not None:
            await _bounded("health", self._health.enter_graceful_shutdown(), 5)
        if self.service is not None:
            await self.service.drain(grace, hurry)
            self.service = None
        if self._server is not None:
            # Calls are over; this closes connections (and cancels any straggler).
            await _bounded("grpc server", self._server.stop(1.0), 10)
            self._server = None
        if self.limits is not None:
            # Calls are over: give back every slice this process holds.
            await _bounded("limits", self.limits.stop(), 10)
            self.limits = None
        if self.ledger is not None:
            await _bounded("usage ledger", self.ledger.close(), 60)
            self.ledger = None
        if self._guard is not None:
            # After the ledger: its last records released their reservations.
            await _bounded("request-id releases", self._guard.close(), 10)
            self._guard = None
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        if self._upstream is not None:
            await _bounded("upstream client", self._upstream.aclose(), 5)
            self._upstream = None
        if self.callers is not None:
            await _bounded("caller table", self.callers.stop(), 5)
            self.callers = None
        if self._callers_pool is not None:
            await self._callers_pool.close()
            self._callers_pool = None
        if self._report_pool is not None:
            await self._report_pool.close()
            self._report_pool = None
        if self._reservation_pool is not None:
            await self._reservation_pool.close()
            self._reservation_pool = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self._providers is not None:
            # Last: flushes the spans and metrics of everything above.
            await asyncio.to_thread(self._providers.shutdown)
            self._providers = None

    @property
    def upstream_connections(self) -> int:
        """Upstream connections open now, idle ones included."""
        return self._upstream.open_connections if self._upstream is not None else 0

    def _observe(self) -> None:
        """Gauges read at each metrics export."""
        breaker, ledger, upstream = self.breaker, self.ledger, self._upstream
        if upstream is not None:
            self.telemetry.observe(
                "chatgate.upstream.connections",
                "{connection}",
                "Upstream connections open, idle ones included (idle ones the server closed are reaped)",
                lambda: [(float(upstream.open_connections), {"chatgate.upstream": upstream.name})],
            )
        if breaker is not None:
            self.telemetry.observe(
                "chatgate.breaker.state",
                "1",
                "Upstream circuit breaker: 0 closed, 1 half-open, 2 open",
                lambda: [(float(breaker.state), {"chatgate.upstream": breaker.name})],
            )
        if ledger is not None:
            self.telemetry.observe(
                "chatgate.ledger.queue_depth",
                "{record}",
                "Usage records waiting for the ledger writer",
                lambda: [(float(ledger.depth), {})],
            )
            self.telemetry.observe(
                "chatgate.ledger.spool_records",
                "{record}",
                "Usage records in the spool waiting for Postgres (non-zero: rows not in Postgres yet)",
                lambda: [(float(ledger.stats().spooled_records), {})],
            )
            self.telemetry.observe(
                "chatgate.ledger.spool_size",
                "By",
                "Bytes in the usage spool",
                lambda: [(float(ledger.stats().spool_bytes), {})],
            )
            self.telemetry.observe(
                "chatgate.ledger.dead_lettered",
                "{record}",
                "Usage records Postgres refused since start, kept in the spool's dead-letter file "
                "(non-zero: run `chatgate usage-dead-letters list`)",
                lambda: [(float(ledger.stats().dead_lettered), {})],
            )
            self.telemetry.observe(
                "chatgate.ledger.state",
                "1",
                "Usage ledger: 0 writing to Postgres, 1 spooling, 2 full (calls refused)",
                lambda: [(float(ledger.state), {})],
            )
