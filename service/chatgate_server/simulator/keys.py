"""Which credential a request carried, recorded without the credential itself.

A record keeps how it came (``bearer``: ``Authorization: Bearer``; ``api-key``), a short
fingerprint (the first 12 hex digits of its SHA-256: enough to tell a handful of test
keys apart, useless for recovering one) and, when the simulator was given an
allow-list of named keys, the key's name. Tests use this to prove a key never crosses
deployments; the key itself never reaches a record, the stats endpoint or a log.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

AuthScheme = Literal["bearer", "api-key"]


def fingerprint(key: str) -> str:
    """The short, one-way fingerprint a record shows for ``key``."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class KeySeen:
    """The credential of one request: how it came, its fingerprint, its allow-list name."""

    scheme: AuthScheme | None = None
    fingerprint: str | None = None
    name: str | None = None

    @property
    def present(self) -> bool:
        """Whether a non-empty credential was sent."""
        return self.scheme is not None


NO_KEY = KeySeen()
_CACHED_KEYS = 64


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None."""
    auth = headers.get("authorization", "")
    if auth[:7].lower() != "bearer ":
        return None
    return auth[7:].strip() or None


def api_key(headers: Mapping[str, str]) -> str | None:
    """The value of Azure's ``api-key`` header, or None."""
    return headers.get("api-key", "").strip() or None


class KeyRing:
    """The named keys a simulator accepts; without any, every non-empty key is accepted."""

    def __init__(self, keys: Mapping[str, str] | None = None) -> None:
        for name, secret in (keys or {}).items():
            if not name or not secret:
                raise ValueError("simulator keys need a non-empty name and secret")
        self._keys = dict(keys or {})
        # The few keys a test uses, described once: hashing on every request costs.
        self._seen: dict[tuple[AuthScheme, str], KeySeen] = {}

    @property
    def restricted(self) -> bool:
        """Whether only the listed keys are accepted."""
        return bool(self._keys)

    def seen(self, scheme: AuthScheme, secret: str) -> KeySeen:
        """Describe ``secret``; ``name`` is None when it is not on the list."""
        cached = self._seen.get((scheme, secret))
        if cached is not None:
            return cached
        name = next(
            (n for n, s in self._keys.items() if hmac.compare_digest(s.encode(), secret.encode())),
            None,
        )
        key = KeySeen(scheme, fingerprint(secret), name)
        if len(self._seen) < _CACHED_KEYS:
            self._seen[(scheme, secret)] = key
        return key

    def accepts(self, key: KeySeen) -> bool:
        """Whether ``key`` may be served (any key when no list was given)."""
        return key.present and (not self._keys or key.name is not None)
