"""Fixtures that boot real things: the simulator on a loopback port, chatgate on port 0."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import grpc
import psycopg
import pytest

from chatgate.v1 import chat_pb2_grpc
from chatgate_server.admission import Policy
from chatgate_server.app import App
from chatgate_server.config import ListenAddress, Secret, Settings
from chatgate_server.simulator import Simulator
from chatgate_server.telemetry import NO_TELEMETRY, Telemetry
from chatgate_server.usage.migrate import apply_migrations

if TYPE_CHECKING:
    from chatgate.v1.chat_pb2_grpc import ChatServiceAsyncStub

# A recognisable fake key: tests assert it never leaks into statuses, rows or logs.
TEST_API_KEY = "sk-test-chatgate-DO-NOT-LEAK-4f1c9a"


@pytest.fixture(scope="session")
def migrated_database_url(database_url: str) -> str:
    apply_migrations(database_url)
    return database_url


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    sim = Simulator()
    await sim.start(host="127.0.0.1", port=0)
    try:
        yield sim
    finally:
        await sim.stop()


def make_settings(database_url: str, base_url: str, **overrides: object) -> Settings:
    settings = Settings.from_env(
        {
            "OPENAI_API_KEY": TEST_API_KEY,
            "OPENAI_BASE_URL": base_url,
            "DATABASE_URL": database_url,
            "CHATGATE_LISTEN": "127.0.0.1:0",
            "CHATGATE_SHUTDOWN_GRACE_SECONDS": "1",
            # A spool of its own per app: spool directories are owned by one process.
            "CHATGATE_SPOOL_DIR": tempfile.mkdtemp(prefix="chatgate-spool-"),
            # Most tests are about what happens to a call, not who makes it: they call as
            # the anonymous caller. Authentication is tested with it on, by test_auth.py
            # (auth="tokens"), and every other test can turn it on the same way.
            "CHATGATE_AUTH": "off",
        }
    )
    return replace(settings, **overrides)  # type: ignore[arg-type]


@pytest.fixture
async def app(migrated_database_url: str, simulator: Simulator) -> AsyncIterator[App]:
    application = App(make_settings(migrated_database_url, simulator.base_url), telemetry=NO_TELEMETRY)
    await application.start()
    try:
        yield application
    finally:
        await application.stop(0)


AppFactory = Callable[..., Awaitable[App]]


@pytest.fixture
async def start_app(migrated_database_url: str, simulator: Simulator) -> AsyncIterator[AppFactory]:
    """Start chatgate with settings overridden (e.g. ``deadline_cap_s=1``), and admission
    policies added after the built-in ones (``extra_policies=``); stopped afterwards."""
    apps: list[App] = []

    async def factory(
        telemetry: Telemetry | None = None, extra_policies: Sequence[Policy] = (), **overrides: object
    ) -> App:
        application = App(
            make_settings(migrated_database_url, simulator.base_url, **overrides),
            telemetry=telemetry or NO_TELEMETRY,
            extra_policies=extra_policies,
        )
        await application.start()
        apps.append(application)
        return application

    try:
        yield factory
    finally:
        for application in apps:
            await application.stop(0)


@pytest.fixture
async def stub(app: App) -> AsyncIterator[ChatServiceAsyncStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


@pytest.fixture
def db(migrated_database_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(migrated_database_url, autocommit=True) as conn:
        yield conn


__all__ = ["TEST_API_KEY", "ListenAddress", "Secret", "make_settings"]
