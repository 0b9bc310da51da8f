"""Strings on their way into Postgres, made storable whatever they hold.

Validation at the request edge is the first line; this is the last. A value Postgres
cannot store fails its whole batch, and a row that fails for what it holds would fail
on every retry: one 3,000-character model name once exceeded the B-tree limit of
``usage_daily``'s primary key (SQLSTATE 54000, about 2,700 bytes per index row) and
stopped billing. So every string bound for a column is cut here to a documented size,
in UTF-8 bytes (what the index limit counts), at a character boundary:

=========================================  ======
request_id                                   512
tenant, caller_service                       256
user_id, requested_model, resolved_model    1024
upstream_response_id                        1024
price_version, grpc_status, usage_source,     64
estimate_encoding, finish_reason, trace_id
tag key / tag value                     256 / 1024
=========================================  ======

``usage_daily``'s key (tenant, user, model) stays under 2.4 KB and every index row of
``usage_records`` under it too. A cut value keeps its head and gets a hash of the whole
value appended, so two long values that share a prefix stay two keys, and the same
value is cut the same way every time (a replay still finds its row).

NUL becomes U+FFFD (``text`` and ``jsonb`` cannot hold it) and a lone surrogate
(from a JSON ``\\ud800`` escape upstream) becomes ``?``: neither can be encoded for
Postgres, and either would otherwise make its batch unwritable forever.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

REQUEST_ID_BYTES = 512
TENANT_BYTES = 256
USER_ID_BYTES = 1024
MODEL_BYTES = 1024
RESPONSE_ID_BYTES = 1024
CODE_BYTES = 64
TAG_KEY_BYTES = 256
TAG_VALUE_BYTES = 1024

# "~" and 16 hex digits of the value's SHA-256: distinct long values stay distinct.
_HASH_SUFFIX_BYTES = 17


def text(value: str, max_bytes: int) -> str:
    """``value`` storable as ``text`` and at most ``max_bytes`` UTF-8 bytes long."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    if value.isascii():  # O(1) in CPython: the common case costs a length check
        return value if len(value) <= max_bytes else _cut(value, value.encode(), max_bytes)
    encoded = value.encode("utf-8", "replace")  # a lone surrogate becomes "?"
    value = encoded.decode("utf-8")
    return value if len(encoded) <= max_bytes else _cut(value, encoded, max_bytes)


def opt_text(value: str | None, max_bytes: int) -> str | None:
    return None if value is None else text(value, max_bytes)


def tags(values: Mapping[str, str]) -> dict[str, str]:
    return {text(k, TAG_KEY_BYTES): text(v, TAG_VALUE_BYTES) for k, v in values.items()}


def _cut(value: str, encoded: bytes, max_bytes: int) -> str:
    digest = hashlib.sha256(encoded).hexdigest()[:16]
    head = encoded[: max_bytes - _HASH_SUFFIX_BYTES].decode("utf-8", "ignore")  # whole characters
    return f"{head}~{digest}"
