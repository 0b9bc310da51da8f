"""What a request cost: per-model list prices and :func:`cost_of`.

Money is integers throughout. Prices are held in micro-dollars per million tokens
(``$2.50 / 1M`` is ``2_500_000``), so a cost is ``tokens × price / 1_000_000``
micro-dollars; the three parts are summed exactly and divided once, rounding half up
to the micro-dollar. No float ever touches money.

How tokens are priced (OpenAI's usage semantics, see ``domain.TokenUsage``):

- cached input is part of input: the cached tokens are priced at the cached rate and
  the rest (``input − cached``) at the input rate — never both;
- reasoning tokens are part of output and are billed as output; they are not added
  again.

Model names resolve by longest prefix at a ``-`` boundary, so the dated snapshot the
upstream reports (``gpt-4o-2024-08-06``) finds its family (``gpt-4o``) and
``gpt-4o-mini-…`` finds ``gpt-4o-mini``, while ``gpt-5.1`` does not silently take
``gpt-5``'s price. The flip side: a new variant (``…-pro``) inherits its family's price
until it gets a row of its own — which is why the variants known to be priced
differently are listed below even where chatgate's callers rarely use them. A model
with no match has no price: its cost is ``None`` (and a warning is logged once per
model), which the ledger stores as NULL — visible, never a crash and never a guess.

When prices change, edit the table and bump :data:`PRICE_VERSION`; every usage row
records the version its cost was computed with.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from chatgate_server.domain import Cost, TokenUsage

log = logging.getLogger(__name__)

PRICE_VERSION = "2026-11-01"
"""The version of :data:`PRICES`, stored with every cost computed from it."""

_TOKENS_PER_PRICE_UNIT = 1_000_000


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """List prices of one model, in micro-dollars per million tokens."""

    input: int
    cached_input: int
    """Models without prompt-caching discounts charge the input price here."""
    output: int


def _usd(dollars: str) -> int:
    """``"2.50"`` → 2_500_000 micro-dollars, parsed from text so no float is involved."""
    whole, _, frac = dollars.partition(".")
    if len(frac) > 6:
        raise ValueError(f"price {dollars!r} is finer than a micro-dollar")
    return int(whole) * 1_000_000 + int(frac.ljust(6, "0"))


def _price(input_usd: str, cached_usd: str | None, output_usd: str) -> ModelPrice:
    return ModelPrice(_usd(input_usd), _usd(cached_usd or input_usd), _usd(output_usd))


# Standard-tier list prices in USD per 1M tokens (input, cached input, output), from
# https://openai.com/api/pricing as of PRICE_VERSION. None: no caching discount.
PRICES: Mapping[str, ModelPrice] = MappingProxyType(
    {
        "gpt-5": _price("1.25", "0.125", "10.00"),
        "gpt-5-mini": _price("0.25", "0.025", "2.00"),
        "gpt-5-nano": _price("0.05", "0.005", "0.40"),
        "gpt-5-pro": _price("15.00", None, "120.00"),
        "gpt-4.1": _price("2.00", "0.50", "8.00"),
        "gpt-4.1-mini": _price("0.40", "0.10", "1.60"),
        "gpt-4.1-nano": _price("0.10", "0.025", "0.40"),
        "gpt-4o": _price("2.50", "1.25", "10.00"),
        # The first gpt-4o snapshot kept its launch price and has no caching discount.
        "gpt-4o-2024-05-13": _price("5.00", None, "15.00"),
        "gpt-4o-mini": _price("0.15", "0.075", "0.60"),
        "o3": _price("2.00", "0.50", "8.00"),
        "o3-pro": _price("20.00", None, "80.00"),
        "o3-mini": _price("1.10", "0.55", "4.40"),
        "o3-deep-research": _price("10.00", "2.50", "40.00"),
        "o4-mini": _price("1.10", "0.275", "4.40"),
        "o4-mini-deep-research": _price("2.00", "0.50", "8.00"),
        "o1": _price("15.00", "7.50", "60.00"),
        "o1-mini": _price("1.10", "0.55", "4.40"),
        "o1-pro": _price("150.00", None, "600.00"),
    }
)
"""Model family → price. Read-only; change it by editing this file (and PRICE_VERSION)."""


def price_of(model: str) -> ModelPrice | None:
    """The price for ``model``: exact name, else the longest family ``model`` extends."""
    price = PRICES.get(model)
    if price is not None:
        return price
    # Strip "-suffix" pieces from the right: the first hit is the longest prefix.
    name = model
    while "-" in name:
        name = name.rpartition("-")[0]
        price = PRICES.get(name)
        if price is not None:
            return price
    return None


def cost_of(model: str, usage: TokenUsage) -> Cost:
    """What ``usage`` on ``model`` cost, in micro-dollars, rounded half up once.

    Pass the resolved model when the upstream reported one (it may be a dated
    snapshot priced differently), else the requested one. Never raises: an unknown
    model gives ``Cost(None, PRICE_VERSION)``. Counts are clamped to be consistent
    (no negatives; cached at most input) rather than trusted blindly.
    """
    price = price_of(model)
    if price is None:
        _warn_unknown(model)
        return Cost(usd_micros=None, price_version=PRICE_VERSION)
    input_tokens = max(usage.input_tokens, 0)
    cached = min(max(usage.cached_input_tokens, 0), input_tokens)
    output_tokens = max(usage.output_tokens, 0)  # includes reasoning tokens
    scaled = (
        (input_tokens - cached) * price.input + cached * price.cached_input + output_tokens * price.output
    )
    # Round half up: exact for non-negative integers, unlike round() (banker's) or floats.
    usd_micros = (scaled + _TOKENS_PER_PRICE_UNIT // 2) // _TOKENS_PER_PRICE_UNIT
    return Cost(usd_micros=usd_micros, price_version=PRICE_VERSION)


# Model names come from callers, so the once-per-model memory is bounded.
_MAX_WARNED = 1000
_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_unknown(model: str) -> None:
    with _warned_lock:
        if model in _warned or len(_warned) >= _MAX_WARNED:
            return
        _warned.add(model)
    log.warning(
        "no price for model %.100r (price version %s): its cost is recorded as unknown",
        model,
        PRICE_VERSION,
    )
