"""The composition root: opens every resource, wires the parts, closes them in reverse."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2
from psycopg_pool import AsyncConnectionPool

from chatgate_server.completion import CompletionService
from chatgate_server.config import Settings
from chatgate_server.rpc.server import CHAT_SERVICE, build_server
from chatgate_server.rpc.servicer import ChatServicer
from chatgate_server.upstream.breaker import CircuitBreaker
from chatgate_server.upstream.openai import OpenAIUpstream
from chatgate_server.upstream.retry import RetryPolicy
from chatgate_server.usage import tokens
from chatgate_server.usage.ledger import UsageLedger
from chatgate_server.usage.migrate import apply_migrations, pending_migrations
from chatgate_server.usage.store import UsageStore

log = logging.getLogger(__name__)


class StartupError(Exception):
    """A resource could not be opened; the message says which, without secrets."""


class App:
    """chatgate, assembled. ``await start()``, then ``await stop()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port: int | None = None
        self._pool: AsyncConnectionPool | None = None
        self._upstream: OpenAIUpstream | None = None
        self.ledger: UsageLedger | None = None
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self.breaker: CircuitBreaker | None = None
        self.service: CompletionService | None = None

    async def start(self) -> int:
        """Open resources and start serving; returns the bound port."""
        s = self.settings
        try:
            if s.migrate_on_start:
                applied = await asyncio.to_thread(apply_migrations, s.database_url)
                if applied:
                    log.info("applied migrations: %s", ", ".join(applied))
            pending = await asyncio.to_thread(pending_migrations, s.database_url)
            self._pool = AsyncConnectionPool(s.database_url, min_size=1, max_size=4, open=False)
            await self._pool.open(wait=True, timeout=10)
        except Exception as exc:  # noqa: BLE001 - any failure here means: no database
            await self.stop(0)
            raise StartupError(f"cannot use the database at DATABASE_URL ({type(exc).__name__})") from None
        if pending:
            await self.stop(0)
            raise StartupError(
                f"the database at DATABASE_URL lacks migrations {', '.join(pending)}: "
                "run `chatgate migrate` (or set CHATGATE_MIGRATE_ON_START=true)"
            )
        # Estimates happen on cancel paths, where a half-second tokenizer load would
        # hold up the usage row: load it before serving.
        await asyncio.to_thread(tokens.warm_up)
        store = UsageStore(self._pool)
        await store.ensure_partitions()
        self.ledger = UsageLedger(store, queue_size=s.ledger_queue_size, batch_size=s.ledger_batch_size)
        self.ledger.start()
        self._upstream = OpenAIUpstream(
            s.openai_base_url,
            s.openai_api_key,
            connect_timeout=s.upstream_connect_timeout_s,
            max_connections=s.upstream_max_connections,
        )
        self.breaker = CircuitBreaker(
            self._upstream.name,
            failure_threshold=s.breaker_failure_threshold,
            cooldown_s=s.breaker_cooldown_s,
            max_cooldown_s=s.breaker_max_cooldown_s,
        )
        self.service = service = CompletionService(
            self._upstream,
            self.ledger,
            tokens.TiktokenEstimator(),
            breaker=self.breaker,
            retry_policy=RetryPolicy(
                max_attempts=s.retry_max_attempts, base_s=s.retry_base_s, cap_s=s.retry_cap_s
            ),
            first_byte_timeout_s=s.upstream_first_byte_timeout_s,
        )
        chat = ChatServicer(service, deadline_cap_s=s.deadline_cap_s)
        self._server, self._health = build_server(chat, max_concurrent_streams=s.max_concurrent_streams)
        self.port = self._server.add_insecure_port(str(s.listen))
        if self.port == 0:
            await self.stop(0)
            raise StartupError(f"cannot listen on {s.listen} (CHATGATE_LISTEN)")
        await self._server.start()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(CHAT_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        log.info("chatgate serving on %s:%d, upstream %s", s.listen.host, self.port, s.openai_base_url)
        return self.port

    async def stop(self, grace: float | None = None, hurry: asyncio.Event | None = None) -> None:
        """Drain and close, in reverse order of opening.

        Health turns NOT_SERVING and new calls are refused at once; running calls get
        ``grace`` seconds (the configured grace when None; less when ``hurry`` is set)
        and are then cut with their final event and usage row; the ledger is flushed.
        """
        grace = self.settings.shutdown_grace_s if grace is None else grace
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self.service is not None:
            await self.service.drain(grace, hurry)
            self.service = None
        if self._server is not None:
            # Calls are over; this closes connections (and cancels any straggler).
            await self._server.stop(1.0)
            self._server = None
        if self.ledger is not None:
            await self.ledger.close()
            self.ledger = None
        if self._upstream is not None:
            await self._upstream.aclose()
            self._upstream = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
