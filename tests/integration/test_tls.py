"""TLS and mTLS on a real grpc.aio server with certificates made here: who gets in, which
identity a client certificate proves, and certificates rotated without a restart."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from chatgate_server.rpc.tls import ReloadingTls, TlsFiles, certificate_identity
from tests.certs import Authority, Issued

SPIFFE_ID = "spiffe://acme.example/billing-api"


def _who(request: bytes, context: grpc.ServicerContext) -> bytes:
    return (certificate_identity(context.auth_context()) or "-").encode()


async def serve(files: TlsFiles) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("test.Tls", {"Who": grpc.unary_unary_rpc_method_handler(_who)})]
    )
    port = server.add_secure_port("127.0.0.1:0", ReloadingTls(files).credentials())
    await server.start()
    return server, port


async def who(port: int, ca: bytes, client: Issued | None) -> str:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        who_am_i: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/test.Tls/Who")
        reply = await who_am_i(b"", timeout=5)
    return reply.decode()


@pytest.fixture
async def mtls(tmp_path: Path) -> AsyncIterator[tuple[Authority, int, TlsFiles]]:
    ca = Authority()
    cert, key = ca.issue("chatgate", server=True).write(tmp_path, "server")
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    files = TlsFiles(cert, key, tmp_path / "ca.crt")
    server, port = await serve(files)
    try:
        yield ca, port, files
    finally:
        await server.stop(None)


async def test_a_certificate_from_the_clients_ca_proves_its_uri_san(
    mtls: tuple[Authority, int, TlsFiles],
) -> None:
    ca, port, _ = mtls
    assert await who(port, ca.pem, ca.issue("billing-api", uri=SPIFFE_ID)) == SPIFFE_ID
    # Without a URI SAN the subject names the caller.
    assert await who(port, ca.pem, ca.issue("reports-api")) == "CN=reports-api"


@pytest.mark.parametrize("kind", ["none", "other CA", "expired"])
async def test_no_foreign_or_expired_client_certificate_gets_in(
    mtls: tuple[Authority, int, TlsFiles], kind: str
) -> None:
    ca, port, _ = mtls
    client = {
        "none": None,
        "other CA": Authority("someone else").issue("intruder", uri=SPIFFE_ID),
        "expired": ca.issue("old", uri=SPIFFE_ID, expired=True),
    }[kind]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await who(port, ca.pem, client)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_plain_tls_without_client_certificates(tmp_path: Path) -> None:
    ca = Authority()
    cert, key = ca.issue("chatgate", server=True).write(tmp_path, "server")
    server, port = await serve(TlsFiles(cert, key))
    try:
        assert await who(port, ca.pem, None) == "-"
    finally:
        await server.stop(None)


async def test_a_rotated_server_certificate_is_used_without_a_restart(
    mtls: tuple[Authority, int, TlsFiles], tmp_path: Path
) -> None:
    ca, port, files = mtls
    client = ca.issue("billing-api", uri=SPIFFE_ID)
    assert await who(port, ca.pem, client) == SPIFFE_ID
    # A new server certificate from a new CA, and that CA also trusted for clients.
    new_ca = Authority("rotated CA")
    issued = new_ca.issue("chatgate", server=True)
    files.cert.write_bytes(issued.cert_pem)
    files.key.write_bytes(issued.key_pem)
    assert files.client_ca is not None
    files.client_ca.write_bytes(ca.pem + new_ca.pem)
    os.utime(files.cert)
    assert await who(port, new_ca.pem, client) == SPIFFE_ID
    with pytest.raises(grpc.aio.AioRpcError):
        await who(port, ca.pem, client)  # the old server certificate is gone
