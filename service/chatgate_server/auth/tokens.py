"""Service tokens: ``cgt_<public id>_<secret>``, stored only as a SHA-256 of the secret.

The public id (16 base32 characters, 80 bits) names the credential in logs, spans and
usage rows without revealing it; the secret is 32 random bytes (256 bits) in URL-safe
base64. Why a plain SHA-256 rather than bcrypt or argon2: those slow hashes protect
low-entropy passwords from guessing; a 256-bit random secret cannot be guessed, and a
slow hash would cost milliseconds on every call. The digest is compared in constant
time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

PREFIX = "cgt_"
# One match for the whole token (this runs on every call): the public id, then the secret.
_TOKEN = re.compile(r"cgt_([a-z2-7]{16})_([A-Za-z0-9_-]{43})")


class MalformedToken(ValueError):
    """The text is not a chatgate token (the message never repeats the text)."""


@dataclass(frozen=True, slots=True)
class Token:
    """A token split into its public id and its secret."""

    public_id: str
    secret: str

    def __str__(self) -> str:
        return f"{PREFIX}{self.public_id}_{self.secret}"

    def __repr__(self) -> str:  # never print the secret by accident
        return f"Token(public_id={self.public_id!r}, secret=<hidden>)"


def mint() -> Token:
    """A new random token."""
    public_id = base64.b32encode(secrets.token_bytes(10)).decode().lower()
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    return Token(public_id, secret)


def parse(text: str) -> Token:
    """Split ``cgt_<id>_<secret>``; :class:`MalformedToken` for anything else."""
    match = _TOKEN.fullmatch(text)
    if match is None:
        if not text.startswith(PREFIX):
            raise MalformedToken("not a chatgate token (expected cgt_…)")
        raise MalformedToken("malformed chatgate token")
    return Token(match[1], match[2])


def digest(secret: str) -> bytes:
    """What the database keeps of a secret."""
    return hashlib.sha256(secret.encode()).digest()


def matches(secret: str, stored: bytes) -> bool:
    """Whether ``secret`` hashes to ``stored`` (constant time)."""
    return hmac.compare_digest(digest(secret), stored)
