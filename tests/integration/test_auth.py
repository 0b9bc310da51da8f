"""Authentication on (CHATGATE_AUTH=tokens) against a real server and real Postgres: who
gets in with which credential, what a refusal says, what tenancy a credential decides,
mTLS with certificates made here, and that no secret leaks anywhere."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from psycopg_pool import AsyncConnectionPool

from chatgate.v1 import chat_pb2 as pb
from chatgate.v1 import chat_pb2_grpc, usage_pb2_grpc
from chatgate.v1 import usage_pb2 as upb
from chatgate_server.app import App
from chatgate_server.auth import tokens
from chatgate_server.auth.records import OPERATOR_ROLE
from chatgate_server.auth.store import CallerStore, NewCaller
from chatgate_server.rpc.health_probe import LIVENESS_SERVICE
from chatgate_server.simulator import Simulator
from chatgate_server.telemetry import NO_TELEMETRY
from tests.certs import Authority, Issued
from tests.integration.conftest import TEST_API_KEY, AppFactory, make_settings
from tests.integration.pgproxy import running_proxy
from tests.integration.test_tracing import Captured
from tests.integration.test_workers import free_port, serving

MODEL = "gpt-4o-mini::chunks=3"


@dataclass
class Refusal:
    code: grpc.StatusCode
    reason: str
    message: str
    raw: str  # everything the caller got: message and details


def refusal_of(error: grpc.aio.AioRpcError) -> Refusal:
    status = rpc_status.from_call(error)
    assert status is not None, f"{error.code()} without rich details: {error.details()}"
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    assert len(infos) == 1 and infos[0].domain == "chatgate"
    return Refusal(error.code(), infos[0].reason, status.message, str(status) + str(error.details()))


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def request(user: str = "user-1", model: str = MODEL) -> pb.CompleteRequest:
    return pb.CompleteRequest(model=model, user_id=user, messages=[pb.Message(role=pb.ROLE_USER, text="hi")])


async def complete(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = (), **fields: Any
) -> list[pb.CompleteResponse]:
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    return [e async for e in stub.Complete(request(**fields), metadata=metadata, timeout=30)]


async def refused(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = (), **fields: Any
) -> Refusal:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await complete(channel, metadata, **fields)
    return refusal_of(caught.value)


def unique(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns()}"


@pytest.fixture
async def store(migrated_database_url: str) -> AsyncIterator[CallerStore]:
    async with AsyncConnectionPool(migrated_database_url, min_size=1, max_size=2, open=False) as pool:
        await pool.open(wait=True, timeout=10)
        yield CallerStore(pool)


async def new_token(store: CallerStore, tenant: str, name: str = "api", **fields: Any) -> str:
    token = await store.create(NewCaller(tenant, name, **fields))
    assert token is not None
    return str(token)


@pytest.fixture
def captured() -> Captured:
    return Captured()


@pytest.fixture
async def authed(start_app: AppFactory, captured: Captured) -> App:
    return await start_app(telemetry=captured.telemetry, auth="tokens")


@pytest.fixture
async def channel(authed: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{authed.port}") as ch:
        yield ch


# --- tokens ----------------------------------------------------------------------------


async def test_a_valid_token_calls_as_its_tenant_and_caller(
    authed: App,
    channel: grpc.aio.Channel,
    store: CallerStore,
    db: psycopg.Connection[Any],
    captured: Captured,
) -> None:
    tenant = unique("acme")
    token = await new_token(store, tenant, "billing-api")
    await authed.callers.refresh()  # type: ignore[union-attr]
    events = await complete(channel, bearer(token))
    assert events[-1].WhichOneof("event") == "finished"
    request_id = events[0].started.request_id

    assert authed.ledger is not None
    await authed.ledger.flush()
    public_id = tokens.parse(token).public_id
    [row] = db.execute(
        "SELECT tenant, caller_service, credential_id FROM usage_records WHERE request_id = %s",
        (request_id,),
    ).fetchall()
    assert row == (tenant, "billing-api", public_id)
    [span] = [s for s in captured.finished() if s.name.endswith("/Complete")]
    assert span.attributes is not None
    assert span.attributes["chatgate.tenant"] == tenant
    assert span.attributes["chatgate.caller"] == "billing-api"
    assert span.attributes["chatgate.credential_id"] == public_id


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("missing", "CREDENTIAL_MISSING"),
        ("not bearer", "CREDENTIAL_INVALID"),
        ("malformed", "CREDENTIAL_INVALID"),
        ("unknown", "CREDENTIAL_INVALID"),
        ("wrong secret", "CREDENTIAL_INVALID"),
        ("revoked", "CREDENTIAL_REVOKED"),
        ("expired", "CREDENTIAL_EXPIRED"),
    ],
)
async def test_a_call_without_a_good_token_is_unauthenticated_with_its_reason(
    authed: App, channel: grpc.aio.Channel, store: CallerStore, kind: str, reason: str
) -> None:
    tenant = unique("acme")
    good = await new_token(store, tenant)
    metadata = {
        "missing": (),
        "not bearer": (("authorization", f"Basic {good}"),),
        "malformed": bearer("cgt_nonsense"),
        "unknown": bearer(str(tokens.mint())),
        "wrong secret": bearer(f"cgt_{tokens.parse(good).public_id}_{tokens.mint().secret}"),
        "revoked": bearer(good),
        "expired": bearer(
            await new_token(store, tenant, "old", expires_at=datetime.now(UTC) - timedelta(seconds=1))
        ),
    }[kind]
    if kind == "revoked":
        await store.revoke(tenant, "api")
    await authed.callers.refresh()  # type: ignore[union-attr]
    got = await refused(channel, metadata)
    assert (got.code, got.reason) == (grpc.StatusCode.UNAUTHENTICATED, reason)
    assert good not in got.raw and tokens.parse(good).secret not in got.raw


async def test_a_rotated_token_and_its_successor_both_work_during_the_grace(
    authed: App, channel: grpc.aio.Channel, store: CallerStore
) -> None:
    tenant = unique("acme")
    old = await new_token(store, tenant)
    new = str(await store.rotate(tenant, "api", grace=timedelta(hours=1), expires_at=None))
    await authed.callers.refresh()  # type: ignore[union-attr]
    for token in (old, new):
        events = await complete(channel, bearer(token))
        assert events[-1].WhichOneof("event") == "finished"
    # A rotation with no grace retires the old token at once.
    newer = str(await store.rotate(tenant, "api", grace=timedelta(0), expires_at=None))
    await authed.callers.refresh()  # type: ignore[union-attr]
    assert (await refused(channel, bearer(new))).reason == "CREDENTIAL_EXPIRED"
    assert (await complete(channel, bearer(newer)))[-1].WhichOneof("event") == "finished"


async def test_health_and_reflection_need_no_credential(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    services = [s.name async for r in call for s in r.list_services_response.service]
    assert "chatgate.v1.ChatService" in services


async def test_reflection_can_be_closed(start_app: AppFactory) -> None:
    app = await start_app(auth="tokens", reflection=False)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [r async for r in call]
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_model_outside_the_callers_allow_list_is_permission_denied(
    authed: App, channel: grpc.aio.Channel, store: CallerStore
) -> None:
    token = await new_token(store, unique("acme"), allowed_models=("gpt-4o-mini*",))
    await authed.callers.refresh()  # type: ignore[union-attr]
    assert (await complete(channel, bearer(token)))[-1].WhichOneof("event") == "finished"
    got = await refused(channel, bearer(token), model="gpt-4o")
    assert (got.code, got.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    assert "gpt-4o-mini*" in got.message


# --- tenancy in UsageService -------------------------------------------------------------


async def usage_of(channel: grpc.aio.Channel, token: str, tenant: str = "") -> upb.GetUsageResponse:
    start = timestamp_pb2.Timestamp()
    start.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
    stub = usage_pb2_grpc.UsageServiceStub(channel)
    response: upb.GetUsageResponse = await stub.GetUsage(
        upb.GetUsageRequest(start_time=start, tenant=tenant, group_by=[upb.USAGE_DIMENSION_TENANT]),
        metadata=bearer(token),
        timeout=10,
    )
    return response


async def test_a_tenant_reads_only_its_own_usage_and_an_operator_reads_any(
    authed: App, channel: grpc.aio.Channel, store: CallerStore
) -> None:
    a, b = unique("tenant-a"), unique("tenant-b")
    token_a, token_b = await new_token(store, a), await new_token(store, b)
    operator = await new_token(store, unique("ops"), "console", roles=frozenset({OPERATOR_ROLE}))
    await authed.callers.refresh()  # type: ignore[union-attr]
    for token, calls in ((token_a, 1), (token_b, 2)):
        for _ in range(calls):
            await complete(channel, bearer(token))
    assert authed.ledger is not None
    await authed.ledger.flush()

    own = await usage_of(channel, token_a)
    assert [(g.tenant, g.totals.requests) for g in own.groups] == [(a, 1)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await usage_of(channel, token_a, tenant=b)
    got = refusal_of(caught.value)
    assert (got.code, got.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")

    seen_by_operator = await usage_of(channel, operator, tenant=b)
    assert [(g.tenant, g.totals.requests) for g in seen_by_operator.groups] == [(b, 2)]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await usage_of(channel, "")
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --- replicas ----------------------------------------------------------------------------


def serve(database_url: str, base_url: str, port: int) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "OPENAI_API_KEY": TEST_API_KEY,
        "OPENAI_BASE_URL": base_url,
        "DATABASE_URL": database_url,
        "CHATGATE_AUTH": "tokens",
        "CHATGATE_LISTEN": f"127.0.0.1:{port}",
        "CHATGATE_SHUTDOWN_GRACE_SECONDS": "1",
        "CHATGATE_SPOOL_DIR": tempfile.mkdtemp(prefix="chatgate-spool-"),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "chatgate_server", "serve"],
        env=env,
        stderr=tempfile.TemporaryFile(),
        text=True,
    )


async def test_two_processes_on_one_database_see_a_revocation_within_5_s(
    migrated_database_url: str, simulator: Simulator, store: CallerStore
) -> None:
    tenant = unique("acme")
    token = await new_token(store, tenant)
    ports = [free_port(), free_port()]
    procs = [serve(migrated_database_url, simulator.base_url, port) for port in ports]
    try:
        targets = [f"127.0.0.1:{port}" for port in ports]
        deadline = time.monotonic() + 60
        while not all(await asyncio.gather(*(asyncio.to_thread(serving, t) for t in targets))):
            assert all(p.poll() is None for p in procs), "chatgate exited"
            assert time.monotonic() < deadline, "chatgate did not start"
            await asyncio.sleep(0.1)
        channels = [grpc.aio.insecure_channel(t) for t in targets]
        for ch in channels:
            assert (await complete(ch, bearer(token)))[-1].WhichOneof("event") == "finished"
        await store.revoke(tenant, "api")
        revoked_at = time.monotonic()
        for ch in channels:
            while True:
                try:
                    await complete(ch, bearer(token))
                except grpc.aio.AioRpcError as exc:
                    assert refusal_of(exc).reason == "CREDENTIAL_REVOKED"
                    break
                assert time.monotonic() - revoked_at < 5, "a revocation took more than 5 s to apply"
                await asyncio.sleep(0.05)
        for ch in channels:
            await ch.close()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# --- TLS and mTLS ------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Authority
    folder: Path
    server_key_pem: bytes

    def channel(self, port: int, client: Issued | None = None) -> grpc.aio.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca.pem,
            private_key=client.key_pem if client else None,
            certificate_chain=client.cert_pem if client else None,
        )
        return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = Authority()
    issued = ca.issue("chatgate", server=True)
    issued.write(tmp_path, "server")
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    return Pki(ca, tmp_path, issued.key_pem)


async def test_plain_tls_with_a_token(
    start_app: AppFactory, pki: Pki, store: CallerStore, captured: Captured
) -> None:
    app = await start_app(
        telemetry=captured.telemetry,
        auth="tokens",
        tls_cert_file=pki.folder / "server.crt",
        tls_key_file=pki.folder / "server.key",
    )
    token = await new_token(store, unique("acme"))
    await app.callers.refresh()  # type: ignore[union-attr]
    async with pki.channel(app.port or 0) as ch:
        assert (await complete(ch, bearer(token)))[-1].WhichOneof("event") == "finished"
        assert (await refused(ch)).reason == "CREDENTIAL_MISSING"


@pytest.fixture
async def mtls(start_app: AppFactory, pki: Pki) -> App:
    return await start_app(
        auth="tokens",
        tls_cert_file=pki.folder / "server.crt",
        tls_key_file=pki.folder / "server.key",
        tls_client_ca_file=pki.folder / "ca.crt",
    )


@pytest.mark.parametrize("kind", ["none", "other CA", "expired"])
async def test_no_foreign_or_expired_client_certificate_gets_a_call_in(
    mtls: App, pki: Pki, store: CallerStore, kind: str
) -> None:
    identity = f"spiffe://{unique('acme')}.example/api"
    await store.create(NewCaller(unique("acme"), "api", cert_identity=identity))
    await mtls.callers.refresh()  # type: ignore[union-attr]
    client = {
        "none": None,
        "other CA": Authority("someone else").issue("intruder", uri=identity),
        "expired": pki.ca.issue("old", uri=identity, expired=True),
    }[kind]
    async with pki.channel(mtls.port or 0, client) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await complete(ch)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake failed


async def test_a_valid_client_certificate_calls_as_the_caller_it_maps_to(
    mtls: App, pki: Pki, store: CallerStore, db: psycopg.Connection[Any]
) -> None:
    tenant = unique("acme")
    identity = f"spiffe://{tenant}.example/reports"
    await store.create(NewCaller(tenant, "reports", cert_identity=identity))
    await mtls.callers.refresh()  # type: ignore[union-attr]
    async with pki.channel(mtls.port or 0, pki.ca.issue("reports", uri=identity)) as ch:
        events = await complete(ch)
    assert mtls.ledger is not None
    await mtls.ledger.flush()
    [row] = db.execute(
        "SELECT tenant, caller_service, credential_id FROM usage_records WHERE request_id = %s",
        (events[0].started.request_id,),
    ).fetchall()
    [mapping] = [c.public_id for c in await store.credentials(tenant)]
    assert row == (tenant, "reports", mapping)
    # Signed by the right CA but mapped to no caller: in over TLS, refused at the edge.
    async with pki.channel(mtls.port or 0, pki.ca.issue("stranger", uri="spiffe://x/y")) as ch:
        got = await refused(ch)
    assert (got.code, got.reason) == (grpc.StatusCode.UNAUTHENTICATED, "CREDENTIAL_INVALID")


# --- secrets -----------------------------------------------------------------------------


async def test_no_token_or_private_key_in_logs_spans_statuses_or_rows(
    start_app: AppFactory,
    pki: Pki,
    store: CallerStore,
    captured: Captured,
    db: psycopg.Connection[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    app = await start_app(
        telemetry=captured.telemetry,
        auth="tokens",
        tls_cert_file=pki.folder / "server.crt",
        tls_key_file=pki.folder / "server.key",
    )
    tenant = unique("acme")
    token = await new_token(store, tenant)
    revoked = await new_token(store, tenant, "gone")
    await store.revoke(tenant, "gone")
    await app.callers.refresh()  # type: ignore[union-attr]
    wrong = f"cgt_{tokens.parse(token).public_id}_{tokens.mint().secret}"
    statuses = []
    async with pki.channel(app.port or 0) as ch:
        events = await complete(ch, bearer(token))
        for bad in (wrong, revoked, wrong, wrong, "cgt_" + tokens.mint().secret):
            statuses.append((await refused(ch, bearer(bad))).raw)
    assert app.ledger is not None
    await app.ledger.flush()
    rows = db.execute("SELECT * FROM usage_records WHERE tenant = %s", (tenant,)).fetchall()
    assert len(rows) == 1 and events[0].started.request_id in str(rows)

    logs = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    spans = "\n".join(
        f"{s.name} {dict(s.attributes or {})} {s.events} {s.status}" for s in captured.finished()
    )
    metrics = captured.metrics.get_metrics_data()
    everything = "\n".join([logs, spans, str(metrics), *statuses, str(rows)])
    key_body = "".join(pki.server_key_pem.decode().splitlines()[1:-1])
    for secret in (token, revoked, wrong, tokens.parse(token).secret, tokens.parse(wrong).secret, key_body):
        assert secret not in everything
    assert tokens.parse(token).public_id in logs  # the line names the credential instead

    # Failed authentications: every one counted, logged at a bounded rate.
    failures = {
        p.attributes["chatgate.reason"]: p.value for p in captured.metric_points("chatgate.auth.failures")
    }
    assert failures == {"CREDENTIAL_INVALID": 4, "CREDENTIAL_REVOKED": 1}
    lines = [
        r for r in caplog.records if r.getMessage().startswith("authentication failed: CREDENTIAL_INVALID")
    ]
    assert len(lines) == 1


# --- the clients -------------------------------------------------------------------------


async def test_the_python_clients_take_a_token_file_and_tls_files(
    start_app: AppFactory, pki: Pki, store: CallerStore, tmp_path: Path
) -> None:
    from chatgate.client import AsyncClient, ChatgateError, Client, build_request, user

    identity = f"spiffe://{unique('py')}.example/client"
    client_cert, client_key = pki.ca.issue("py-client", uri=identity).write(tmp_path, "client")
    tenant = unique("py")
    await store.create(NewCaller(tenant, "by-cert", cert_identity=identity))
    (tmp_path / "token").write_text(await new_token(store, tenant, "by-token") + "\n")
    app = await start_app(
        auth="tokens",
        tls_cert_file=pki.folder / "server.crt",
        tls_key_file=pki.folder / "server.key",
        tls_client_ca_file=pki.folder / "ca.crt",
    )
    target, ca = f"127.0.0.1:{app.port}", pki.folder / "ca.crt"
    req = build_request(MODEL, [user("hi")], user_id="u1")
    mtls: dict[str, Any] = {"ca_file": ca, "cert_file": client_cert, "key_file": client_key}
    async with AsyncClient(target, token_file=tmp_path / "token", **mtls) as client:
        assert (await client.collect(req)).text

    # The certificate alone proves its caller; with a bad token the token decides.
    def by_certificate() -> str:  # blocking: in a thread, so the server keeps running
        with Client(target, **mtls) as sync_client:
            return sync_client.collect(req).text

    assert await asyncio.to_thread(by_certificate)
    async with AsyncClient(target, token="cgt_nope", **mtls) as client:
        with pytest.raises(ChatgateError) as caught:
            await client.collect(req)
    assert caught.value.known_reason == "CREDENTIAL_INVALID" and not caught.value.retryable
    with pytest.raises(ValueError, match="cert_file and key_file"):
        Client(target, ca_file=ca, cert_file=client_cert)


async def test_the_python_client_over_plain_tls_without_a_token_is_told_so(
    start_app: AppFactory, pki: Pki
) -> None:
    from chatgate.client import AsyncClient, ChatgateError, build_request, user

    app = await start_app(
        auth="tokens", tls_cert_file=pki.folder / "server.crt", tls_key_file=pki.folder / "server.key"
    )
    async with AsyncClient(f"127.0.0.1:{app.port}", ca_file=pki.folder / "ca.crt") as client:
        with pytest.raises(ChatgateError) as caught:
            await client.collect(build_request(MODEL, [user("hi")], user_id="u1"))
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.known_reason == "CREDENTIAL_MISSING"


# --- failing closed, and authentication off -------------------------------------------


async def test_without_its_callers_loaded_chatgate_refuses_every_call(
    simulator: Simulator, store: CallerStore
) -> None:
    token = await new_token(store, unique("acme"))
    # Postgres away since start-up: chatgate serves (usage rows go to the spool) but
    # cannot know any caller, so it authenticates nobody rather than everybody.
    settings = make_settings("postgresql://postgres@127.0.0.1:1/none", simulator.base_url, auth="tokens")
    app = App(settings, telemetry=NO_TELEMETRY)
    await app.start()
    try:
        assert app.callers is not None and not app.callers.loaded
        await refuses_as_callers_unavailable(app, token)
    finally:
        await app.stop(0)


async def refuses_as_callers_unavailable(app: App, token: str) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        got = await refused(ch, bearer(token))
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert (got.code, got.reason) == (grpc.StatusCode.UNAVAILABLE, "CALLERS_UNAVAILABLE")
    # Not ready (balancers send calls elsewhere), but alive: a restart brings no Postgres.
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert await health_status(app, LIVENESS_SERVICE) == health_pb2.HealthCheckResponse.SERVING


async def health_status(app: App, name: str = "") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=name), timeout=5
        )
    return int(reply.status)


async def test_a_replica_turns_ready_once_its_callers_load(
    simulator: Simulator, store: CallerStore, migrated_database_url: str
) -> None:
    token = await new_token(store, unique("acme"))
    async with running_proxy(migrated_database_url) as proxy:
        proxy.cut()  # Postgres gone at start-up
        settings = make_settings(proxy.url_for(migrated_database_url), simulator.base_url, auth="tokens")
        app = App(settings, telemetry=NO_TELEMETRY)
        await app.start()
        try:
            await refuses_as_callers_unavailable(app, token)
            proxy.restore()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
                watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=30)
                async for update in watch:  # NOT_SERVING, then SERVING once the table loads
                    if update.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                watch.cancel()
                assert app.callers is not None and app.callers.loaded
                assert (await complete(ch, bearer(token)))[-1].WhichOneof("event") == "finished"
        finally:
            await app.stop(0)


async def test_authentication_off_is_a_warning_at_start_and_on_the_first_health_check(
    start_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    app = await start_app(auth="off")
    assert sum("CHATGATE_AUTH=off" in r.getMessage() for r in caplog.records) == 1
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        for _ in range(3):
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert (await complete(ch))[-1].WhichOneof("event") == "finished"  # anyone may call
    assert sum("CHATGATE_AUTH=off" in r.getMessage() for r in caplog.records) == 2
