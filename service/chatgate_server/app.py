"""The composition root: opens every resource, wires the parts, closes them in reverse."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from datetime import timedelta
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2
from psycopg_pool import AsyncConnectionPool

from chatgate_server.admission import AdmissionChain, Policy
from chatgate_server.auth.store import CallerStore
from chatgate_server.auth.table import CallerTable
from chatgate_server.completion import CompletionService
from chatgate_server.config import ConfigError, Settings
from chatgate_server.config_watch import ConfigWatch
from chatgate_server.deployments import (
    DeploymentsConfig,
    DeploymentSpec,
    deployment_prices,
    from_settings,
    load_config,
)
from chatgate_server.limits.anomaly_counts import RefusalCounter, RefusalFlusher
from chatgate_server.limits.anomaly_detector import AnomalyDetector
from chatgate_server.limits.anomaly_rules import Finding, Step
from chatgate_server.limits.anomaly_store import add_refusal_counts
from chatgate_server.limits.blocks import BlockPolicy, BlockTable
from chatgate_server.limits.wiring import LimitsRuntime
from chatgate_server.loop_lag import LoopLag
from chatgate_server.rpc.authn import OFF_WARNING, Authenticator
from chatgate_server.rpc.convert import RequestLimits
from chatgate_server.rpc.deployment_health import DeploymentHealth
from chatgate_server.rpc.edge import Edge, EdgeLimits
from chatgate_server.rpc.health_probe import LIVENESS_SERVICE
from chatgate_server.rpc.ledger_health import LedgerHealth
from chatgate_server.rpc.server import CHAT_SERVICE, ConnectionAge, build_health_server, build_server
from chatgate_server.rpc.servicer import ChatServicer
from chatgate_server.rpc.tls import ReloadingTls, TlsFiles
from chatgate_server.rpc.usage_servicer import UsageServicer
from chatgate_server.telemetry import Providers, Telemetry, providers_from_env
from chatgate_server.upstream.assemble import build_router, close_deployments
from chatgate_server.upstream.breaker import CircuitBreaker
from chatgate_server.upstream.deployment import Deployment
from chatgate_server.upstream.retry import RetryPolicy
from chatgate_server.upstream.router import Router
from chatgate_server.usage import tokens
from chatgate_server.usage.admission import RequestIdGuard
from chatgate_server.usage.connect import session_kwargs, with_connect_timeout
from chatgate_server.usage.dberrors import describe
from chatgate_server.usage.ledger import UsageLedger
from chatgate_server.usage.migrate import apply_migrations, database_unreachable, pending_migrations
from chatgate_server.usage.pricing import PriceFileError, PriceTable, load_prices
from chatgate_server.usage.reports import UsageReports, page_token_key
from chatgate_server.usage.reservations import POOL_KWARGS, ReservationStore, configure
from chatgate_server.usage.spool import Spool, SpoolError
from chatgate_server.usage.store import UsageStore

log = logging.getLogger(__name__)

# How long start-up waits for the first load of the caller table; past it chatgate
# serves anyway and refuses authenticated calls (CALLERS_UNAVAILABLE) until it loads.
CALLERS_LOAD_TIMEOUT_S = 10.0
# The same for the block table; past it no blocks apply until it loads.
BLOCKS_LOAD_TIMEOUT_S = 5.0
# How often deployments dropped by a reload are checked for calls still using them.
RETIRE_POLL_S = 0.5
# The readiness hold while the caller table has never loaded (rpc/ledger_health.py).
CALLERS_HOLD = "callers"
# The grace gRPC itself gets at shutdown: longer than any drain, which ends the calls.
_UNTIL_DRAINED_S = 24 * 3600.0


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
        self,
        settings: Settings,
        telemetry: Telemetry | None = None,
        *,
        reuse_port: bool = False,
        extra_policies: Sequence[Policy] = (),
    ) -> None:
        """``telemetry`` defaults to OTLP export configured by the OTEL_* variables;
        ``reuse_port`` shares the port with the other workers of one supervisor;
        ``extra_policies`` run after the built-in admission policies (tests use it to
        script admissions and refusals end to end; nothing in production sets it)."""
        self.settings = settings
        self._reuse_port = reuse_port
        self._extra_policies = tuple(extra_policies)
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
        self._readiness: asyncio.Task[None] | None = None
        self._guard: RequestIdGuard | None = None
        self._spool: Spool | None = None
        self.ledger_health: LedgerHealth | None = None
        self.deployment_health: DeploymentHealth | None = None
        self.router: Router | None = None
        # The running deployments with the specs they were made from (for reloads), and
        # those a reload dropped, closed once no call uses them.
        self._deployed: list[tuple[DeploymentSpec, Deployment]] = []
        self._retiring: list[Deployment] = []
        self._retirer: asyncio.Task[None] | None = None
        self._reloading = asyncio.Lock()
        self._config_watch: ConfigWatch | None = None
        self.ledger: UsageLedger | None = None
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        self.edge: Edge | None = None
        self._health: health.aio.HealthServicer | None = None
        self.breaker: CircuitBreaker | None = None
        self.service: CompletionService | None = None
        self._limits_pool: AsyncConnectionPool | None = None
        self.blocks: BlockTable | None = None
        self.refusals = RefusalCounter()
        self._refusal_flusher: RefusalFlusher | None = None
        self.detector: AnomalyDetector | None = None
        self._loop_lag: LoopLag | None = None
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
        # Behind a transaction-mode pooler: no prepared statements, no session settings.
        pooled = s.database_transaction_pooling
        session = session_kwargs(pooled)
        self._pool = AsyncConnectionPool(
            url, min_size=1, max_size=8, open=False, kwargs=session, reconnect_timeout=s.ledger_retry_cap_s
        )
        self._report_pool = AsyncConnectionPool(url, min_size=1, max_size=4, open=False, kwargs=session)
        # Request-id reservations (usage/reservations.py): a pool of their own, so a burst
        # of ledger batches or reports never makes a call wait for its reservation, and
        # with the settings that make a reservation one cheap round trip (session
        # settings, which a transaction pooler would leak to other clients: not then).
        self._reservation_pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=4,
            open=False,
            kwargs={**POOL_KWARGS, **session},
            configure=None if pooled else configure,
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
        try:
            config = from_settings(s)  # checked with the settings; changed since?
        except ConfigError as exc:
            await self.stop(0)
            raise StartupError(str(exc)) from None
        self.router = build_router(config, s)
        self._deployed = list(zip(config.deployments, self.router.deployments, strict=True))
        # With one deployment (the zero-config default), its breaker is "the" breaker.
        self.breaker = self.router.deployments[0].breaker
        try:
            prices = load_prices(s.prices_file)
        except PriceFileError as exc:  # checked with the settings; changed since?
            await self.stop(0)
            raise StartupError(f"CHATGATE_PRICES_FILE: {exc}") from None
        blocks = await self._blocks(url, postgres_ok)
        self.limits = LimitsRuntime(url, s, prices)
        await self.limits.start(postgres_ok)
        self.service = service = CompletionService(
            self.router,
            self.ledger,
            tokens.TiktokenEstimator(),
            retry_policy=RetryPolicy(
                max_attempts=s.retry_max_attempts, base_s=s.retry_base_s, cap_s=s.retry_cap_s
            ),
            first_byte_timeout_s=s.upstream_first_byte_timeout_s,
            telemetry=self.telemetry,
            # Preconditions' refusals leave no usage row, the policies' do (admission.py):
            # blocks, then limits; extra policies (tests only) after them.
            admission=AdmissionChain(
                preconditions=(self.ledger, self._guard),
                policies=(BlockPolicy(blocks), self.limits.policy, *self._extra_policies),
            ),
            prices=prices,
            deployment_prices=self._deployment_prices(config),
        )
        self._observe()
        authenticator = await self._authenticator(postgres_ok)
        self._loop_lag = LoopLag()
        self._loop_lag.start()
        chat = ChatServicer(
            service,
            deadline_cap_s=s.deadline_cap_s,
            limits=RequestLimits(max_request_bytes=s.max_request_bytes, allowed_models=s.allowed_models),
            loop_lag=self._loop_lag,
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
            refusals=self.refusals,
        )
        self._server, self._health = build_server(
            chat,
            edge=self.edge,
            usage=UsageServicer(
                UsageReports(self._report_pool), page_token_key=page_token_key(config.secret_material)
            ),
            reuse_port=self._reuse_port,
            reflection=s.reflection,
            connection_age=ConnectionAge(s.max_connection_age_s, s.max_connection_age_grace_s),
        )
        try:
            self.port = self._listen(self._server)
            await self._listen_health(self._health, self.edge)
        except StartupError:
            await self.stop(0)
            raise
        await self._server.start()
        self._start_detector()
        # Not ready while the caller table has never loaded: every call would be refused.
        holds = (CALLERS_HOLD,) if self.callers is not None and not self.callers.loaded else ()
        ready = (
            health_pb2.HealthCheckResponse.NOT_SERVING if holds else health_pb2.HealthCheckResponse.SERVING
        )
        await self._health.set("", ready)
        await self._health.set(CHAT_SERVICE, ready)
        # Liveness: never moved by the ledger (rpc/health_probe.py says why).
        await self._health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self.ledger_health = LedgerHealth(self._health, ("", CHAT_SERVICE), holds=holds)
        self.ledger.add_listener(self.ledger_health)
        self.ledger_health(self.ledger.state)
        if holds:
            self._readiness = asyncio.create_task(self._ready_once_callers_load(), name="readiness")
        self.deployment_health = DeploymentHealth(self._health)
        self.deployment_health.track(self.router.deployments)
        if s.config_file is not None and s.config_poll_s > 0:
            # A changed file reloads as SIGHUP does (config_watch.py).
            self._config_watch = ConfigWatch(s.config_file, self.reload, s.config_poll_s)
            self._config_watch.start()
        log.info(
            "chatgate serving on %s:%d (%s, authentication %s), upstream %s",
            s.listen.host,
            self.port,
            "mTLS" if s.tls_client_ca_file else "TLS" if s.tls else "plaintext",
            s.auth,
            _describe(config),
        )
        return self.port

    async def _blocks(self, url: str, postgres_ok: bool) -> BlockTable:
        """The block table (limits/blocks.py), loaded before serving, on a small pool it
        shares with the abuse detector and the refusal counts."""
        self._limits_pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=3,
            open=False,
            timeout=5,
            reconnect_timeout=self.settings.ledger_retry_cap_s,
            kwargs=session_kwargs(self.settings.database_transaction_pooling),
        )
        await self._limits_pool.open(wait=False)
        self.blocks = BlockTable(self._limits_pool)
        await self.blocks.start(BLOCKS_LOAD_TIMEOUT_S if postgres_ok else 1.0)
        return self.blocks

    def _start_detector(self) -> None:
        """The refusal counts' writer and, unless turned off, the abuse detector."""
        pool, settings = self._limits_pool, self.settings.anomaly
        assert pool is not None

        async def write(counts: Any) -> None:
            await add_refusal_counts(pool, counts)

        self._refusal_flusher = RefusalFlusher(self.refusals, write, every_s=settings.flush_s)
        self._refusal_flusher.start()
        if settings.enabled:
            self.detector = AnomalyDetector(pool, settings, on_finding=self._count_finding)
            self.detector.start()

    def _count_finding(self, finding: Finding, step: Step) -> None:
        self.telemetry.anomalies.add(
            1, {"chatgate.anomaly.rule": finding.rule.value, "chatgate.anomaly.action": step.value}
        )

    async def _ready_once_callers_load(self) -> None:
        assert self.callers is not None and self.ledger_health is not None
        await self.callers.wait_loaded()
        log.info("caller table loaded: serving")
        self.ledger_health.release(CALLERS_HOLD)

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
            kwargs=session_kwargs(s.database_transaction_pooling),
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

    async def _listen_health(self, servicer: health.aio.HealthServicer, edge: Edge) -> None:
        """The plaintext health-only port (CHATGATE_HEALTH_LISTEN), when one is set."""
        address = self.settings.health_listen
        if address is None:
            return
        self._health_server = build_health_server(servicer, edge=edge, reuse_port=self._reuse_port)
        try:
            self.health_port = self._health_server.add_insecure_port(str(address))
        except RuntimeError:
            self.health_port = 0
        if self.health_port == 0:
            raise StartupError(
                f"cannot listen on {address}: address already in use or not available "
                "(CHATGATE_HEALTH_LISTEN)"
            )
        await self._health_server.start()
        log.info("health service (plaintext, health only) on %s:%d", address.host, self.health_port)

    async def withdraw(self) -> None:
        """Report NOT_SERVING on every health name from now on, and keep serving calls.

        For a preStop hook (``chatgate prestop``): load balancers and clients that watch
        health stop sending new calls before SIGTERM starts the drain. It sticks: the
        ledger's listener cannot turn a name SERVING again (gRPC's health servicer
        ignores every later change once in this state).
        """
        if self._health is None:
            return
        await self._health.enter_graceful_shutdown()
        log.info("prestop: health is NOT_SERVING from now on; calls are still served until SIGTERM")

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

        Clients get a GOAWAY and the port takes no new connections, health turns
        NOT_SERVING and new calls are refused at once; running calls get ``grace``
        seconds (the configured grace when None; less when ``hurry`` is set) and are
        then cut with their final event and usage row; the ledger is flushed.
        """
        grace = self.settings.shutdown_grace_s if grace is None else grace
        goaway: asyncio.Future[None] | None = None
        if self._server is not None:
            # GOAWAY now: clients open no new streams here (a round_robin client moves
            # to the other replicas at once; a call already on its way is refused by the
            # transport, or cancelled unrun if gRPC's core had queued it (grpc/grpc#41785),
            # and the clients' retry policy sends either elsewhere); running streams go
            # on. gRPC is given no deadline of its own: the drain below ends them.
            goaway = asyncio.ensure_future(self._server.stop(_UNTIL_DRAINED_S))
            await asyncio.sleep(0)  # let it send the GOAWAY before anything else
        if self._config_watch is not None:
            await self._config_watch.stop()  # no reload while the service goes away
            self._config_watch = None
        if self.deployment_health is not None:
            await self.deployment_health.close()
            self.deployment_health = None
        if self._health is not None:
            await _bounded("health", self._health.enter_graceful_shutdown(), 5)
        if self.service is not None:
            await self.service.drain(grace, hurry)
            self.service = None
        if self._server is not None:
            # Calls are over; this closes connections (and cancels any straggler).
            await _bounded("grpc server", self._server.stop(1.0), 10)
            self._server = None
        if goaway is not None and not goaway.done():
            goaway.cancel()
        if self._health_server is not None:
            await _bounded("health server", self._health_server.stop(0), 5)
            self._health_server = None
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
        if self._retirer is not None:
            self._retirer.cancel()
            self._retirer = None
        if self.router is not None:
            retiring, self._retiring = self._retiring, []
            await _bounded("upstream clients", close_deployments([*self.router.deployments, *retiring]), 5)
            self.router = None
        if self.detector is not None:
            await _bounded("anomaly detector", self.detector.stop(), 5)
            self.detector = None
        if self._loop_lag is not None:
            await self._loop_lag.stop()
            self._loop_lag = None
        if self._refusal_flusher is not None:
            await _bounded("refusal counts", self._refusal_flusher.stop(), 5)
            self._refusal_flusher = None
        if self.blocks is not None:
            await _bounded("block table", self.blocks.stop(), 5)
            self.blocks = None
        if self._limits_pool is not None:
            await self._limits_pool.close()
            self._limits_pool = None
        if self._readiness is not None:
            self._readiness.cancel()
            self._readiness = None
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

    async def reload(self) -> bool:
        """Re-read CHATGATE_CONFIG (on SIGHUP, or when the file changed): new calls use the
        new deployments and routes, running calls finish on the deployment they started
        on, and a deployment left unchanged keeps its connections, breaker and headroom.
        A file with a problem is refused with one log line and the running configuration
        kept."""
        path = self.settings.config_file
        if path is None or self.service is None or self.router is None:
            log.warning("reload: nothing to reload (CHATGATE_CONFIG is not set)")
            return False
        async with self._reloading:
            if self._config_watch is not None:
                # What is read now counts as seen: the watch does not repeat this reload.
                await asyncio.to_thread(self._config_watch.rebase)
            try:
                config = await asyncio.to_thread(load_config, path)
                # Read before anything is swapped: a price file broken since start-up
                # (CHATGATE_PRICES_FILE) refuses the reload whole, not half-applied.
                prices = await asyncio.to_thread(self._deployment_prices, config)
            except (ConfigError, PriceFileError) as exc:
                log.error("reload refused, the running deployments and routes are kept: %s", exc)
                return False
            router = build_router(config, self.settings, keep=self._deployed)
            kept = {id(d) for d in router.deployments}
            dropped = [d for _, d in self._deployed if id(d) not in kept]
            self._deployed = list(zip(config.deployments, router.deployments, strict=True))
            self.router = router
            self.breaker = router.deployments[0].breaker
            self.service.use_router(router, prices)
            if self.deployment_health is not None:
                self.deployment_health.track(router.deployments)
            self._retire(dropped)
        log.info("reloaded %s: upstream %s", path, _describe(config))
        return True

    def _deployment_prices(self, config: DeploymentsConfig) -> dict[str, PriceTable]:
        return deployment_prices(config, self.settings.prices_file)

    def _retire(self, dropped: list[Deployment]) -> None:
        """Close the adapters of deployments a reload dropped once no call uses them."""
        self._retiring += dropped
        if self._retiring and self._retirer is None:
            self._retirer = asyncio.get_running_loop().create_task(self._close_retired(), name="retire")

    async def _close_retired(self) -> None:
        try:
            while self._retiring:
                idle = [d for d in self._retiring if d.in_flight == 0]
                self._retiring = [d for d in self._retiring if d.in_flight > 0]
                await close_deployments(idle)
                if self._retiring:
                    await asyncio.sleep(RETIRE_POLL_S)
        finally:
            self._retirer = None

    @property
    def retiring_deployments(self) -> int:
        """Deployments a reload dropped whose connections are not closed yet (calls
        that started on them are still running)."""
        return len(self._retiring)

    @property
    def upstream_connections(self) -> int:
        """Upstream connections open now, idle ones included, over every deployment."""
        if self.router is None:
            return 0
        return sum(_connections(d) for d in self.router.deployments)

    def _observe(self) -> None:
        """Gauges read at each metrics export."""
        ledger = self.ledger
        if self.router is not None:

            def deployments() -> tuple[Deployment, ...]:
                return self.router.deployments if self.router is not None else ()  # after reloads too

            self.telemetry.observe(
                "chatgate.upstream.connections",
                "{connection}",
                "Upstream connections open, idle ones included (idle ones the server closed are reaped)",
                lambda: [(float(_connections(d)), _labels(d.name)) for d in deployments()],
            )
            self.telemetry.observe(
                "chatgate.breaker.state",
                "1",
                "Upstream circuit breaker per deployment: 0 closed, 1 half-open, 2 open",
                lambda: [(float(d.breaker.state), _labels(d.name)) for d in deployments()],
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


def _connections(deployment: Deployment) -> int:
    return int(getattr(deployment.upstream, "open_connections", 0))


def _labels(deployment: str) -> dict[str, str]:
    # chatgate.upstream kept: dashboards made for one upstream group by it.
    return {"chatgate.deployment": deployment, "chatgate.upstream": deployment}


def _describe(config: DeploymentsConfig) -> str:
    """The deployments for the start-up line: names and URLs, never keys."""
    if config.source == "environment":
        return config.deployments[0].base_url
    listed = ", ".join(f"{d.name} ({d.kind} {d.base_url})" for d in config.deployments)
    return f"deployments from {config.source}: {listed}"
