"""Service tokens and the rule that decides whether a credential may call now."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from chatgate_server.auth import tokens
from chatgate_server.auth.records import Credential
from chatgate_server.errors import CredentialExpired, CredentialRevoked

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def test_a_minted_token_parses_back_and_matches_only_its_own_hash() -> None:
    token = tokens.mint()
    text = str(token)
    assert text.startswith("cgt_")
    assert tokens.parse(text) == token
    assert tokens.matches(token.secret, tokens.digest(token.secret))
    assert not tokens.matches(tokens.mint().secret, tokens.digest(token.secret))


def test_tokens_are_unique_and_carry_256_bits_of_secret() -> None:
    minted = {str(tokens.mint()) for _ in range(1000)}
    assert len(minted) == 1000
    assert len(tokens.mint().secret) == 43  # 32 bytes, URL-safe base64 without padding


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Bearer",
        "sk-proj-abc",
        "cgt_",
        "cgt_short_" + "a" * 43,
        "cgt_" + "a" * 16,
        "cgt_" + "a" * 16 + "_" + "a" * 42,
        "cgt_" + "A" * 16 + "_" + "a" * 43,
        "cgt_" + "a" * 16 + "_" + "a" * 42 + "!",
    ],
)
def test_malformed_tokens_are_refused_without_repeating_them(text: str) -> None:
    with pytest.raises(tokens.MalformedToken) as caught:
        tokens.parse(text)
    if text:
        assert text not in str(caught.value)


def test_a_token_never_prints_its_secret() -> None:
    token = tokens.mint()
    assert token.secret not in repr(token)


def _credential(**overrides: object) -> Credential:
    fields: dict[str, object] = {
        "public_id": "abcdefghijklmnop",
        "tenant": "acme",
        "caller_name": "billing-api",
        "roles": frozenset(),
        "allowed_models": None,
        "token_sha256": b"",
        "created_at": NOW - timedelta(days=1),
    }
    fields.update(overrides)
    return Credential(**fields)  # type: ignore[arg-type]


def test_revoked_and_expired_credentials_are_refused_with_their_own_reason() -> None:
    assert _credential().refusal(NOW) is None
    assert _credential(expires_at=NOW + timedelta(seconds=1)).refusal(NOW) is None
    assert isinstance(_credential(expires_at=NOW).refusal(NOW), CredentialExpired)
    assert isinstance(_credential(revoked_at=NOW - timedelta(seconds=1)).refusal(NOW), CredentialRevoked)
    # Revoked wins over expired: the operator's act is the more useful reason.
    both = _credential(revoked_at=NOW, expires_at=NOW - timedelta(days=1))
    assert isinstance(both.refusal(NOW), CredentialRevoked)
    assert both.status(NOW) == "revoked"


def test_the_caller_names_the_credential_not_the_secret() -> None:
    caller = _credential(roles=frozenset({"operator"})).caller()
    assert (caller.tenant, caller.service, caller.credential_id) == (
        "acme",
        "billing-api",
        "abcdefghijklmnop",
    )
    assert caller.roles == frozenset({"operator"})
