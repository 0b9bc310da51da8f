"""What a request cost: the price table (data, not code) and :meth:`PriceTable.bill`.

Prices live in ``prices.csv`` beside this module (shipped with the package), one row per
model and price version: input, cached input and output in USD per million tokens and
the UTC date the row takes effect (``valid_from``). An operator's own file
(``CHATGATE_PRICES_FILE``, same format) is read over it: for every model the operator's
file names, its rows replace all of the shipped rows of that model (so a negotiated
price is never overtaken by a later shipped row); other models keep the shipped rows.

Lookup never guesses. A model matches a row by its exact name, or as a dated snapshot
of an exact name (``gpt-4o-mini-2024-07-18`` → ``gpt-4o-mini``: the name plus
``-YYYY-MM-DD``); an exact row wins over the snapshot rule (``gpt-4o-2024-05-13`` has
its own price). Anything else — ``gpt-4o-minii``, ``gpt-4o-audio`` — has no price: its
cost is NULL with basis ``price_unknown``, a warning is logged once per model, and the
service counts it (``chatgate.usage.unpriced``).

The version in force for a call is the model's row with the latest ``valid_from`` on or
before the day the call started (a model's first row also covers earlier calls: the
table knows no older price). Every row records the version it was priced with:
``valid_from``, prefixed ``operator:`` when the row came from the operator's file.

Money is integers: prices are micro-dollars per million tokens (``$2.50 / 1M`` is
``2_500_000``), so a cost is ``tokens × price / 1_000_000`` micro-dollars; the three
parts are summed exactly and divided once, rounding half up. No float touches money.

How tokens are priced (OpenAI's usage semantics, see ``domain.TokenUsage``): cached
input is part of input, so cached tokens are priced at the cached rate and the rest
(``input − cached``) at the input rate; reasoning tokens are part of output and billed
as output, never added again.
"""

from __future__ import annotations

import csv
import logging
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import cache
from importlib import resources
from pathlib import Path

from chatgate_server.domain import Cost, CostBasis, Outcome, TokenUsage

log = logging.getLogger(__name__)

_TOKENS_PER_PRICE_UNIT = 1_000_000
_HEADER = ["model", "input", "cached_input", "output", "valid_from"]
_SNAPSHOT = re.compile(r"^(?P<name>.+)-(?P<date>\d{4}-\d{2}-\d{2})$")
_USD = re.compile(r"^\d+(\.\d{1,6})?$")

NO_PRICE_VERSION = "none"
"""The ``price_version`` of a row priced from no table row (not charged, price unknown)."""

# Outcomes that, when no response ever started, mean the upstream refused the call or
# failed before producing anything (or it never reached the upstream): nothing to pay.
# A caller that left, a deadline or a shutdown cut while the upstream may have been
# working keeps its estimate.
_UNCHARGED_OUTCOMES = frozenset({Outcome.REJECTED, Outcome.UPSTREAM_ERROR})


class PriceFileError(ValueError):
    """A price file is unreadable or malformed; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """List prices of one model, in micro-dollars per million tokens."""

    input: int
    cached_input: int
    """Models without prompt-caching discounts charge the input price here."""
    output: int


@dataclass(frozen=True, slots=True)
class PriceRow:
    """One row of a price table."""

    model: str
    valid_from: date
    price: ModelPrice
    operator: bool = False
    """From the operator's file rather than the shipped one."""

    @property
    def version(self) -> str:
        """What usage rows record as ``price_version``."""
        day = self.valid_from.isoformat()
        return f"operator:{day}" if self.operator else day


def is_charged(outcome: Outcome, responded: bool) -> bool:
    """Whether a call costs anything: not when the upstream refused or failed before
    producing anything (``responded``: a response started or usage was reported)."""
    return responded or outcome not in _UNCHARGED_OUTCOMES


def usd_micros(dollars: str) -> int:
    """``"2.50"`` → 2_500_000 micro-dollars, parsed from text so no float is involved."""
    if not _USD.match(dollars):
        raise ValueError(f"{dollars!r} is not a price in dollars with at most 6 decimals")
    whole, _, frac = dollars.partition(".")
    return int(whole) * 1_000_000 + int(frac.ljust(6, "0"))


class PriceTable:
    """Price rows by model and version, with the lookup and the arithmetic."""

    def __init__(self, rows: Iterable[PriceRow]) -> None:
        by_model: dict[str, list[PriceRow]] = {}
        for row in rows:
            by_model.setdefault(row.model, []).append(row)
        self._rows = {m: sorted(rs, key=lambda r: r.valid_from) for m, rs in by_model.items()}
        self._warned: set[str] = set()
        self._warned_lock = threading.Lock()

    @property
    def rows(self) -> list[PriceRow]:
        return [row for rows in self._rows.values() for row in rows]

    def lookup(self, model: str, at: datetime | None = None) -> PriceRow | None:
        """The row pricing ``model`` at ``at`` (default now): exact name, else a dated
        snapshot of an exact name; None when there is neither."""
        rows = self._rows.get(model)
        if rows is None:
            match = _SNAPSHOT.match(model)
            if match is None or not _is_date(match["date"]):
                return None
            rows = self._rows.get(match["name"])
            if rows is None:
                return None
        day = (at or datetime.now(UTC)).astimezone(UTC).date()
        chosen = rows[0]
        for row in rows:
            if row.valid_from <= day:
                chosen = row
        return chosen

    def cost(self, model: str, usage: TokenUsage, at: datetime | None = None) -> Cost:
        """What ``usage`` on ``model`` cost at ``at``, rounded half up once.

        Pass the resolved model when the upstream reported one (a dated snapshot may be
        priced differently), else the requested one. Never raises: an unknown model
        gives a NULL cost with basis ``price_unknown``. Counts are clamped to be
        consistent (no negatives; cached at most input) rather than trusted blindly.
        """
        row = self.lookup(model, at)
        if row is None:
            self._warn_unknown(model)
            return Cost(None, NO_PRICE_VERSION, CostBasis.PRICE_UNKNOWN)
        price = row.price
        input_tokens = max(usage.input_tokens, 0)
        cached = min(max(usage.cached_input_tokens, 0), input_tokens)
        output_tokens = max(usage.output_tokens, 0)  # includes reasoning tokens
        scaled = (
            (input_tokens - cached) * price.input + cached * price.cached_input + output_tokens * price.output
        )
        # Round half up: exact for non-negative integers, unlike round() (banker's) or floats.
        micros = (scaled + _TOKENS_PER_PRICE_UNIT // 2) // _TOKENS_PER_PRICE_UNIT
        return Cost(micros, row.version, CostBasis.PRICED)

    def bill(
        self, model: str, usage: TokenUsage, *, outcome: Outcome, responded: bool, at: datetime | None = None
    ) -> Cost:
        """The cost a usage row records: zero, and saying so, for a call that was not
        charged (:func:`is_charged`); else :meth:`cost`."""
        if not is_charged(outcome, responded):
            return Cost(0, NO_PRICE_VERSION, CostBasis.NOT_CHARGED)
        return self.cost(model, usage, at)

    # Model names come from callers, so the once-per-model memory is bounded.
    _MAX_WARNED = 1000

    def _warn_unknown(self, model: str) -> None:
        with self._warned_lock:
            if model in self._warned or len(self._warned) >= self._MAX_WARNED:
                return
            self._warned.add(model)
        log.warning(
            "no price for model %.100r: its cost is recorded as unknown (add it to CHATGATE_PRICES_FILE)",
            model,
        )


def _is_date(text: str) -> bool:
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def parse_price_file(text: str, name: str, *, operator: bool = False) -> list[PriceRow]:
    """The rows of a price file (CSV, ``#`` comment lines allowed); PriceFileError names
    the file and line of the first problem."""
    numbered = [
        (n, [cell.strip() for cell in next(csv.reader([line]))])
        for n, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not numbered or numbered[0][1] != _HEADER:
        where = f" line {numbered[0][0]}" if numbered else ""
        raise PriceFileError(f"{name}{where}: the header must be {','.join(_HEADER)}")
    rows: list[PriceRow] = []
    seen: set[tuple[str, date]] = set()
    for n, cells in numbered[1:]:
        try:
            row = _parse_row(cells, operator)
        except ValueError as exc:
            raise PriceFileError(f"{name} line {n}: {exc}") from None
        if (row.model, row.valid_from) in seen:
            raise PriceFileError(f"{name} line {n}: a second {row.model} row valid from {row.valid_from}")
        seen.add((row.model, row.valid_from))
        rows.append(row)
    return rows


def _parse_row(cells: list[str], operator: bool) -> PriceRow:
    if len(cells) != len(_HEADER):
        raise ValueError(f"{len(cells)} fields where {len(_HEADER)} are expected")
    model, input_usd, cached_usd, output_usd, valid_from = cells
    if not model or any(c.isspace() for c in model):
        raise ValueError(f"model {model!r} must be a name without spaces")
    try:
        day = date.fromisoformat(valid_from)
    except ValueError:
        raise ValueError(f"valid_from {valid_from!r} must be a date, YYYY-MM-DD") from None
    price = ModelPrice(usd_micros(input_usd), usd_micros(cached_usd or input_usd), usd_micros(output_usd))
    return PriceRow(model, day, price, operator)


def merge(shipped: Iterable[PriceRow], operator: Iterable[PriceRow]) -> list[PriceRow]:
    """The operator's rows, plus the shipped rows of every model the operator does not name."""
    own = list(operator)
    named = {row.model for row in own}
    return [row for row in shipped if row.model not in named] + own


def read_operator_file(path: Path) -> list[PriceRow]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8, or a NUL in the name
        raise PriceFileError(f"{path}: cannot be read ({type(exc).__name__})") from None
    return parse_price_file(text, str(path), operator=True)


@cache
def shipped_rows() -> tuple[PriceRow, ...]:
    """The price table shipped with chatgate (``usage/prices.csv``)."""
    text = resources.files(__package__ or "chatgate_server.usage").joinpath("prices.csv").read_text("utf-8")
    return tuple(parse_price_file(text, "prices.csv"))


def load_prices(operator_file: Path | None = None, deployment_file: Path | None = None) -> PriceTable:
    """The shipped table, with the operator's file (CHATGATE_PRICES_FILE) over it, and a
    deployment's own file (chatgate.toml ``prices_file``) over both."""
    own = read_operator_file(operator_file) if operator_file is not None else []
    rows = merge(shipped_rows(), own)
    if deployment_file is not None:
        rows = merge(rows, read_operator_file(deployment_file))
    return PriceTable(rows)


@cache
def default_table() -> PriceTable:
    """The shipped table alone (tests, benchmarks, and callers given no table)."""
    return PriceTable(shipped_rows())


def cost_of(model: str, usage: TokenUsage, at: datetime | None = None) -> Cost:
    """:meth:`PriceTable.cost` with the shipped table."""
    return default_table().cost(model, usage, at)


PRICE_VERSION = max(row.valid_from for row in shipped_rows()).isoformat()
"""The newest ``valid_from`` in the shipped table (the version most rows get today)."""
