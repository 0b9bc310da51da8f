"""The edge's credential step on its own (rpc/authn.py): which credential wins, and that
failures are counted every time but logged at a bounded rate, never with the secret."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

import pytest

from chatgate_server.auth import tokens
from chatgate_server.auth.records import Credential
from chatgate_server.auth.table import CallerTable
from chatgate_server.domain import ANONYMOUS_CALLER
from chatgate_server.errors import CallersUnavailable, CredentialInvalid, CredentialMissing
from chatgate_server.rpc.authn import LOG_EVERY_S, Authenticator


class Store:
    def __init__(self, credentials: list[Credential]) -> None:
        self._credentials = credentials

    async def version(self) -> int:
        return 1

    async def credentials(self, tenant: str | None = None) -> list[Credential]:
        return self._credentials


class Context:
    def __init__(self, metadata: tuple[tuple[str, str], ...] = (), identity: str | None = None) -> None:
        self._metadata = metadata
        self._identity = identity

    def invocation_metadata(self) -> Any:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"peer_spiffe_id": [self._identity.encode()]} if self._identity else {}

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"


class Counter:
    def __init__(self) -> None:
        self.added: list[dict[str, str]] = []

    def add(self, amount: int, attributes: dict[str, str]) -> None:
        self.added.append(attributes)


class Telemetry:
    def __init__(self) -> None:
        self.auth_failures = Counter()


def credential(token: tokens.Token | None, *, identity: str | None = None, name: str = "api") -> Credential:
    return Credential(
        public_id=token.public_id if token else tokens.mint().public_id,
        tenant="acme",
        caller_name=name,
        roles=frozenset(),
        allowed_models=None,
        token_sha256=tokens.digest(token.secret) if token else None,
        created_at=datetime.now(UTC),
        cert_identity=identity,
    )


def loaded(*credentials: Credential) -> CallerTable:
    table = CallerTable(Store(list(credentials)))  # type: ignore[arg-type]
    asyncio.run(table.refresh())
    return table


def test_a_token_wins_over_a_certificate_and_a_certificate_needs_mtls() -> None:
    token = tokens.mint()
    table = loaded(credential(token), credential(None, identity="spiffe://x/cert", name="by-cert"))
    both = Context((("authorization", f"Bearer {token}"),), identity="spiffe://x/cert")
    assert Authenticator(table, certificates=True).resolve(both).service == "api"  # type: ignore[arg-type]
    cert_only = Context(identity="spiffe://x/cert")
    assert Authenticator(table, certificates=True).resolve(cert_only).service == "by-cert"  # type: ignore[arg-type]
    with pytest.raises(CredentialMissing):  # without client certificates required, identity is not looked at
        Authenticator(table).resolve(cert_only)  # type: ignore[arg-type]
    assert Authenticator(None).resolve(Context()) is ANONYMOUS_CALLER  # type: ignore[arg-type]


def test_a_table_never_loaded_refuses_every_call() -> None:
    table = CallerTable(Store([]))  # type: ignore[arg-type]
    with pytest.raises(CallersUnavailable):
        Authenticator(table).resolve(Context((("authorization", f"Bearer {tokens.mint()}"),)))  # type: ignore[arg-type]


def test_failures_are_all_counted_but_logged_once_per_reason_per_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    telemetry = Telemetry()
    auth = Authenticator(loaded(), telemetry=telemetry, clock=lambda: now[0])  # type: ignore[arg-type]
    bad = str(tokens.mint())
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            with pytest.raises(CredentialInvalid):
                auth.resolve(Context((("authorization", f"Bearer {bad}"),)))  # type: ignore[arg-type]
        with pytest.raises(CredentialMissing):
            auth.resolve(Context())  # type: ignore[arg-type]
        now[0] = LOG_EVERY_S + 1
        with pytest.raises(CredentialInvalid):
            auth.resolve(Context((("authorization", "Bearer nonsense"),)))  # type: ignore[arg-type]
    assert [a["chatgate.reason"] for a in telemetry.auth_failures.added] == ["CREDENTIAL_INVALID"] * 5 + [
        "CREDENTIAL_MISSING",
        "CREDENTIAL_INVALID",
    ]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0].startswith("authentication failed: CREDENTIAL_INVALID (unknown credential)")
    assert lines[1].startswith("authentication failed: CREDENTIAL_MISSING")
    assert "4 more CREDENTIAL_INVALID" in lines[2]
    assert not any(bad in line or "nonsense" in line for line in lines)
