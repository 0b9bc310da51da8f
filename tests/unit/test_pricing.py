"""Prices: the shipped table against its source, name matching, versions, the operator's
file, what refused calls cost, and the arithmetic (cached and reasoning tokens, rounding)."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from chatgate_server.config import ConfigError, Settings, prices_file_from_env
from chatgate_server.domain import Cost, CostBasis, Outcome, TokenUsage
from chatgate_server.telemetry import Telemetry
from chatgate_server.usage import pricing
from chatgate_server.usage.pricing import (
    NO_PRICE_VERSION,
    PRICE_VERSION,
    ModelPrice,
    PriceFileError,
    PriceRow,
    PriceTable,
    cost_of,
    default_table,
    is_charged,
    load_prices,
    parse_price_file,
    read_operator_file,
    shipped_rows,
)

# The source figures, typed from OpenAI's pricing page (https://openai.com/api/pricing,
# Standard tier, USD per 1M tokens: input, cached input, output; None where the page
# lists no cached-input price), as read on the date of each block. Kept apart from
# usage/prices.csv on purpose: a slip in either one fails the tests below. A new price
# version is a new block here (its date = the row's valid_from) and a new row there.
PUBLISHED_2026_11_01: dict[str, tuple[str, str | None, str]] = {
    "gpt-5": ("$1.25", "$0.125", "$10.00"),
    "gpt-5-mini": ("$0.25", "$0.025", "$2.00"),
    "gpt-5-nano": ("$0.05", "$0.005", "$0.40"),
    "gpt-5-pro": ("$15.00", None, "$120.00"),
    "gpt-4.1": ("$2.00", "$0.50", "$8.00"),
    "gpt-4.1-mini": ("$0.40", "$0.10", "$1.60"),
    "gpt-4.1-nano": ("$0.10", "$0.025", "$0.40"),
    "gpt-4o": ("$2.50", "$1.25", "$10.00"),
    "gpt-4o-2024-05-13": ("$5.00", None, "$15.00"),
    "gpt-4o-mini": ("$0.15", "$0.075", "$0.60"),
    "o1": ("$15.00", "$7.50", "$60.00"),
    "o1-mini": ("$1.10", "$0.55", "$4.40"),
    "o1-pro": ("$150.00", None, "$600.00"),
    "o3": ("$2.00", "$0.50", "$8.00"),
    "o3-mini": ("$1.10", "$0.55", "$4.40"),
    "o3-pro": ("$20.00", None, "$80.00"),
    "o3-deep-research": ("$10.00", "$2.50", "$40.00"),
    "o4-mini": ("$1.10", "$0.275", "$4.40"),
    "o4-mini-deep-research": ("$2.00", "$0.50", "$8.00"),
}
# (model, valid_from) → figures.
PUBLISHED: dict[tuple[str, str], tuple[str, str | None, str]] = {
    (model, "2026-11-01"): figures for model, figures in PUBLISHED_2026_11_01.items()
}

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def micros(published: str) -> int:
    """``"$2.50"`` → micro-dollars, by Decimal (independent of the code under test)."""
    value = Decimal(published.removeprefix("$")) * 1_000_000
    assert value == value.to_integral_value()
    return int(value)


def row(model: str, day: str, input_usd: str, cached_usd: str, output_usd: str, **kw: bool) -> PriceRow:
    price = ModelPrice(micros(input_usd), micros(cached_usd), micros(output_usd))
    return PriceRow(model, date.fromisoformat(day), price, **kw)


# --- the shipped table -------------------------------------------------------------------


def test_the_shipped_table_lists_exactly_the_published_rows() -> None:
    shipped = [(r.model, r.valid_from.isoformat()) for r in shipped_rows()]
    assert sorted(shipped) == sorted(PUBLISHED)
    assert max(day for _, day in PUBLISHED) == PRICE_VERSION


@pytest.mark.parametrize(("model", "valid_from"), sorted(PUBLISHED))
def test_every_shipped_row_matches_its_published_figure(model: str, valid_from: str) -> None:
    input_usd, cached_usd, output_usd = PUBLISHED[(model, valid_from)]
    (shipped,) = [r for r in shipped_rows() if (r.model, r.valid_from.isoformat()) == (model, valid_from)]
    assert shipped.price == ModelPrice(
        input=micros(input_usd),
        cached_input=micros(cached_usd or input_usd),  # no discount: cached is input
        output=micros(output_usd),
    )
    assert not shipped.operator


def test_the_shipped_table_is_package_data_read_from_the_package() -> None:
    # pyproject ships *.csv as package data; the table is read with importlib.resources.
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert '"*.csv"' in pyproject
    assert len(default_table().rows) == len(PUBLISHED)


# --- matching: exact names and dated snapshots, never a guess -----------------------------


@pytest.mark.parametrize(
    ("model", "priced_as"),
    [
        ("gpt-4o", "gpt-4o"),
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-11-20", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("o3-2025-04-16", "o3"),
        ("gpt-5-pro-2025-10-06", "gpt-5-pro"),
        # An exact row wins over the snapshot rule: the launch snapshot kept its price.
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),
    ],
)
def test_exact_names_and_their_dated_snapshots_are_priced(model: str, priced_as: str) -> None:
    table = default_table()
    found = table.lookup(model, NOW)
    assert found is not None and found.model == priced_as
    usage = TokenUsage(input_tokens=123_457, output_tokens=7_891, cached_input_tokens=1_024)
    assert table.cost(model, usage, NOW) == table.cost(priced_as, usage, NOW)


@pytest.mark.parametrize(
    "model",
    [
        "gpt-4o-minii",  # a typo the upstream accepted: was priced as gpt-4o
        "gpt-4o-audio-preview",  # a different model of the family: was priced as gpt-4o
        "gpt-4o-realtime",
        "gpt-5-codex",
        "gpt-4o-mini-20240718",  # not the -YYYY-MM-DD form
        "gpt-4o-2024-13-45",  # not a date
        "gpt-4o-mini-2024-07-18-extra",
        "gpt-4o-mini::status=500",  # the simulator's scenario suffix
        "GPT-4O",
        "gpt-5.1",
        "gpt",
        "o",
        "",
        "claude-3-opus",
    ],
)
def test_anything_else_has_no_price(model: str) -> None:
    table = default_table()
    assert table.lookup(model, NOW) is None
    cost = table.cost(model, TokenUsage(input_tokens=1000, output_tokens=10), NOW)
    assert cost == Cost(None, NO_PRICE_VERSION, CostBasis.PRICE_UNKNOWN)


def test_an_unknown_model_is_logged_once_per_model(caplog: pytest.LogCaptureFixture) -> None:
    table = PriceTable(shipped_rows())
    model, other = f"mystery-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"
    with caplog.at_level(logging.WARNING, logger="chatgate_server.usage.pricing"):
        for _ in range(3):
            table.cost(model, TokenUsage(input_tokens=10))
        table.cost(other, TokenUsage())
        table.cost("gpt-4o", TokenUsage(input_tokens=10))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum(model in w for w in warnings) == 1
    assert sum(other in w for w in warnings) == 1
    assert len(warnings) == 2


def test_the_unpriced_metric_counts_by_model_with_bounded_names() -> None:
    reader = InMemoryMetricReader()
    telemetry = Telemetry(meter_provider=MeterProvider(metric_readers=[reader]))
    telemetry.count_unpriced("gpt-4o-minii")
    telemetry.count_unpriced("gpt-4o-minii")
    for i in range(150):  # caller-chosen names must not grow the metric without bound
        telemetry.count_unpriced(f"made-up-{i}")
    data = reader.get_metrics_data()
    assert data is not None
    counts = {
        str((p.attributes or {})["chatgate.priced_model"]): p.value  # type: ignore[union-attr]
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "chatgate.usage.unpriced"
        for p in m.data.data_points
    }
    assert counts["gpt-4o-minii"] == 2
    assert len(counts) == 101 and counts["(other)"] == 51


# --- versions: a later valid_from takes effect by itself ---------------------------------


def test_a_later_version_takes_effect_on_its_day() -> None:
    table = PriceTable(
        [
            row("m", "2026-01-01", "$1.00", "$0.50", "$2.00"),
            row("m", "2026-12-05", "$3.00", "$1.50", "$6.00"),
        ]
    )
    usage = TokenUsage(input_tokens=1_000_000)
    before = table.cost("m", usage, datetime(2026, 12, 4, 23, 59, 59, tzinfo=UTC))
    after = table.cost("m", usage, datetime(2026, 12, 5, 0, 0, tzinfo=UTC))
    assert before == Cost(1_000_000, "2026-01-01", CostBasis.PRICED)
    assert after == Cost(3_000_000, "2026-12-05", CostBasis.PRICED)
    # A snapshot follows its model's versions.
    assert table.cost("m-2026-12-01", usage, NOW).price_version == "2026-01-01"


def test_a_models_first_row_also_covers_earlier_calls() -> None:
    table = PriceTable([row("m", "2026-06-01", "$1.00", "$1.00", "$1.00")])
    assert table.cost("m", TokenUsage(input_tokens=1_000_000), datetime(2020, 1, 1, tzinfo=UTC)) == Cost(
        1_000_000, "2026-06-01", CostBasis.PRICED
    )


def test_a_version_applies_by_utc_day() -> None:
    from datetime import timedelta, timezone

    table = PriceTable(
        [row("m", "2026-01-01", "$1.00", "$1.00", "$1.00"), row("m", "2026-12-05", "$2.00", "$2.00", "$2.00")]
    )
    # 01:00 on Dec 5 in UTC+2 is still Dec 4 in UTC.
    at = datetime(2026, 12, 5, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    assert table.cost("m", TokenUsage(input_tokens=1_000_000), at).price_version == "2026-01-01"


# --- the operator's file -----------------------------------------------------------------

HEADER = "model,input,cached_input,output,valid_from\n"


def test_the_operators_file_replaces_the_models_it_names_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "prices.csv"
    path.write_text(
        "# negotiated prices\n"
        + HEADER
        + "gpt-4o,2.00,,8.00,2026-01-01\n"
        + "ft:gpt-4o-mini:acme::abc123,0.30,0.15,1.20,2026-01-01\n"
    )
    table = load_prices(path)
    usage = TokenUsage(input_tokens=1_000_000, cached_input_tokens=500_000, output_tokens=1_000_000)
    # gpt-4o: only the operator's row (no discount), marked as the operator's version.
    assert table.cost("gpt-4o", usage, NOW) == Cost(10_000_000, "operator:2026-01-01", CostBasis.PRICED)
    assert table.cost("gpt-4o-2024-08-06", usage, NOW).price_version == "operator:2026-01-01"
    # A model the shipped table lacks.
    assert table.cost("ft:gpt-4o-mini:acme::abc123", usage, NOW).usd_micros == 150_000 + 75_000 + 1_200_000
    # Models the file does not name keep their shipped price.
    assert table.cost("gpt-4o-mini", usage, NOW) == default_table().cost("gpt-4o-mini", usage, NOW)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "header must be"),
        ("model,input,output\n", "line 1: the header must be"),
        (HEADER + "gpt-4o,2.50,1.25,10.00\n", "line 2: 4 fields where 5"),
        (HEADER + "gpt-4o,2.50,1.25,ten,2026-01-01\n", "line 2: 'ten' is not a price"),
        (HEADER + "gpt-4o,-1,1.25,10,2026-01-01\n", "line 2: '-1' is not a price"),
        (HEADER + "gpt-4o,0.0000001,,10,2026-01-01\n", "is not a price in dollars with at most 6 decimals"),
        (HEADER + "gpt-4o,2.50,1.25,10.00,2026-13-01\n", "line 2: valid_from '2026-13-01' must be a date"),
        (HEADER + ",2.50,1.25,10.00,2026-01-01\n", "line 2: model '' must be a name"),
        (
            HEADER + "\n# c\ngpt-4o,1,1,1,2026-01-01\ngpt-4o,2,2,2,2026-01-01\n",
            "line 5: a second gpt-4o row valid from 2026-01-01",
        ),
    ],
)
def test_a_malformed_price_file_names_the_line(text: str, error: str) -> None:
    with pytest.raises(PriceFileError, match=error.replace("(", r"\(")):
        parse_price_file(text, "ops.csv")


def test_chatgate_prices_file_is_checked_when_settings_are_read(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    good.write_text(HEADER + "gpt-4o,2.00,,8.00,2026-01-01\n")
    bad.write_text(HEADER + "gpt-4o,2.00,,8.00,someday\n")
    assert prices_file_from_env({}) is None
    assert prices_file_from_env({"CHATGATE_PRICES_FILE": str(good)}) == good
    with pytest.raises(ConfigError, match=r"^CHATGATE_PRICES_FILE: .*bad.csv line 2: valid_from"):
        prices_file_from_env({"CHATGATE_PRICES_FILE": str(bad)})
    with pytest.raises(ConfigError, match=r"^CHATGATE_PRICES_FILE: .*missing.csv: cannot be read"):
        prices_file_from_env({"CHATGATE_PRICES_FILE": str(tmp_path / "missing.csv")})
    env = {"OPENAI_API_KEY": "sk-x", "DATABASE_URL": "postgresql://x", "CHATGATE_PRICES_FILE": str(good)}
    assert Settings.from_env(env).prices_file == good


# --- refused calls cost nothing ----------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "responded", "charged"),
    [
        (Outcome.REJECTED, False, False),  # never reached the upstream (breaker open, …)
        (Outcome.UPSTREAM_ERROR, False, False),  # 4xx/5xx/429 before any response
        (Outcome.UPSTREAM_ERROR, True, True),  # failed mid-stream: tokens were produced
        (Outcome.COMPLETED, True, True),
        (Outcome.CANCELLED, False, True),  # the caller left: the upstream may have worked
        (Outcome.DEADLINE_EXCEEDED, False, True),
        (Outcome.SHUTDOWN, False, True),
        (Outcome.INTERNAL_ERROR, False, True),
    ],
)
def test_which_calls_are_charged(outcome: Outcome, responded: bool, charged: bool) -> None:
    assert is_charged(outcome, responded) is charged
    usage = TokenUsage(input_tokens=1000, source="estimated")
    cost = default_table().bill("gpt-4o", usage, outcome=outcome, responded=responded, at=NOW)
    if charged:
        assert cost == Cost(2500, PRICE_VERSION, CostBasis.PRICED)
    else:
        assert cost == Cost(0, NO_PRICE_VERSION, CostBasis.NOT_CHARGED)


# --- the arithmetic ----------------------------------------------------------------------


def test_plain_input_and_output_at_list_price() -> None:
    # gpt-4o: $2.50 in, $10.00 out per 1M → 1000 in + 500 out = $0.0025 + $0.005.
    cost = cost_of("gpt-4o", TokenUsage(input_tokens=1000, output_tokens=500))
    assert cost == Cost(usd_micros=7500, price_version=PRICE_VERSION, basis=CostBasis.PRICED)


def test_cached_input_is_priced_at_the_cached_rate_and_not_again_as_input() -> None:
    # 600 uncached × $2.50 + 400 cached × $1.25 per 1M = 1500 + 500 micro-dollars.
    # (Cached also billed as input would be 3000; cached ignored would be 2500.)
    usage = TokenUsage(input_tokens=1000, cached_input_tokens=400)
    assert cost_of("gpt-4o", usage).usd_micros == 2000


def test_a_model_without_caching_discount_charges_cached_tokens_as_input() -> None:
    # o1-pro lists no cached price: 1000 input tokens cost $150/1M whether cached or not.
    cached = TokenUsage(input_tokens=1000, cached_input_tokens=1000)
    assert cost_of("o1-pro", cached).usd_micros == cost_of("o1-pro", TokenUsage(input_tokens=1000)).usd_micros
    assert cost_of("o1-pro", cached).usd_micros == 150_000


@pytest.mark.parametrize(
    ("model", "per_million"), [("o3", 8_000_000), ("o1", 60_000_000), ("o4-mini", 4_400_000)]
)
def test_reasoning_tokens_are_output_and_not_added_again(model: str, per_million: int) -> None:
    # completion_tokens includes the reasoning tokens: 1000 output of which 800 reasoning.
    usage = TokenUsage(input_tokens=0, output_tokens=1000, reasoning_tokens=800)
    assert cost_of(model, usage).usd_micros == per_million * 1000 // 1_000_000


def test_all_parts_together() -> None:
    # gpt-5: $1.25 in, $0.125 cached, $10.00 out per 1M.
    usage = TokenUsage(
        input_tokens=20_000, cached_input_tokens=15_000, output_tokens=3_000, reasoning_tokens=2_000
    )
    # 5000 × 1.25 + 15000 × 0.125 + 3000 × 10 = 6250 + 1875 + 30000
    assert cost_of("gpt-5", usage).usd_micros == 38_125


@pytest.mark.parametrize(
    ("input_tokens", "expected"),
    [
        (9, 0),  # 0.45 micro-dollars → 0
        (10, 1),  # 0.5 → 1: half rounds up
        (11, 1),  # 0.55 → 1
        (30, 2),  # 1.5 → 2
        (50, 3),  # 2.5 → 3 (banker's rounding would give 2)
        (69, 3),  # 3.45 → 3
    ],
)
def test_rounds_half_up_once_at_the_end(input_tokens: int, expected: int) -> None:
    # gpt-5-nano input: $0.05 per 1M = 0.05 micro-dollars per token.
    assert cost_of("gpt-5-nano", TokenUsage(input_tokens=input_tokens)).usd_micros == expected


def test_rounding_happens_once_not_per_part() -> None:
    # gpt-5-nano: 9 input × 0.05 = 0.45 and 1 output × 0.40 = 0.40 micro-dollars.
    # Summed, then rounded: 0.85 → 1. Rounding each part first would give 0 + 0 = 0.
    usage = TokenUsage(input_tokens=9, output_tokens=1)
    assert cost_of("gpt-5-nano", usage).usd_micros == 1


def test_money_is_exact_integers_at_any_scale() -> None:
    usage = TokenUsage(input_tokens=10**15 + 1, output_tokens=10**15 + 3)
    cost = cost_of("gpt-4.1-mini", usage)
    # $0.40 and $1.60 per 1M, computed exactly: no float would get the last digits right.
    exact = ((10**15 + 1) * 400_000 + (10**15 + 3) * 1_600_000 + 500_000) // 1_000_000
    assert cost.usd_micros == exact
    assert type(cost.usd_micros) is int


def test_zero_usage_costs_zero_not_none() -> None:
    assert cost_of("gpt-4o", TokenUsage()).usd_micros == 0


def test_inconsistent_counts_are_clamped_not_trusted() -> None:
    # More cached than input (a broken upstream report): never priced below zero
    # uncached tokens, never a crash.
    usage = TokenUsage(input_tokens=100, cached_input_tokens=500, output_tokens=-5)
    assert (
        cost_of("gpt-4o", usage).usd_micros
        == cost_of("gpt-4o", TokenUsage(input_tokens=100, cached_input_tokens=100)).usd_micros
    )
    assert cost_of("gpt-4o", usage).usd_micros == 125  # 100 × $1.25 per 1M


# --- what the mutation run found unpinned (docs/TESTING.md) ------------------------------


def test_a_version_applies_by_utc_day_whatever_the_servers_timezone(monkeypatch: pytest.MonkeyPatch) -> None:
    # A server run with TZ set: a call at 23:30 on Dec 4 in New York is Dec 5 in UTC.
    table = PriceTable(
        [row("m", "2026-01-01", "$1.00", "$1.00", "$1.00"), row("m", "2026-12-05", "$2.00", "$2.00", "$2.00")]
    )
    at = datetime(2026, 12, 5, 4, 30, tzinfo=UTC)
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        version = table.cost("m", TokenUsage(input_tokens=1_000_000), at).price_version
    finally:
        monkeypatch.undo()
        time.tzset()
    assert version == "2026-12-05"


def test_a_bill_is_priced_on_the_day_the_call_started() -> None:
    # A call that started before a price change and is billed after it pays the old price
    # (the change is long past, so billing "now" would give the new one).
    table = PriceTable(
        [row("m", "2020-01-01", "$1.00", "$1.00", "$1.00"), row("m", "2021-01-01", "$2.00", "$2.00", "$2.00")]
    )
    usage = TokenUsage(input_tokens=1_000_000)
    started = datetime(2020, 12, 31, 23, 59, tzinfo=UTC)
    cost = table.bill("m", usage, outcome=Outcome.COMPLETED, responded=True, at=started)
    assert cost == Cost(1_000_000, "2020-01-01", CostBasis.PRICED)


def test_the_unknown_model_warning_tells_the_operator_what_to_do(caplog: pytest.LogCaptureFixture) -> None:
    table = PriceTable(shipped_rows())
    with caplog.at_level(logging.WARNING, logger="chatgate_server.usage.pricing"):
        table.cost("gpt-4o-minii", TokenUsage())
    assert [r.getMessage() for r in caplog.records] == [
        "no price for model 'gpt-4o-minii': its cost is recorded as unknown (add it to CHATGATE_PRICES_FILE)"
    ]


def test_at_most_a_thousand_unknown_models_are_remembered_and_warned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    table = PriceTable(shipped_rows())
    with caplog.at_level(logging.WARNING, logger="chatgate_server.usage.pricing"):
        for i in range(1001):
            table.cost(f"made-up-{i}", TokenUsage())
    assert len(caplog.records) == 1000
    assert "made-up-1000" not in caplog.text


def test_a_shipped_price_records_its_plain_date_as_version() -> None:
    (parsed,) = parse_price_file(HEADER + "m,1,1,1,2026-01-01\n", "prices.csv")
    assert parsed.version == "2026-01-01"
    assert cost_of("gpt-4o", TokenUsage(input_tokens=1), NOW).price_version == "2026-11-01"


def test_an_indented_comment_line_is_a_comment(tmp_path: Path) -> None:
    path = tmp_path / "prices.csv"
    path.write_text(HEADER + "  # negotiated in November\nm,1.00,,1.00,2026-01-01\n")
    assert [r.model for r in read_operator_file(path)] == ["m"]


def test_the_price_file_errors_say_what_is_wrong_in_full(tmp_path: Path) -> None:
    with pytest.raises(PriceFileError) as empty:
        parse_price_file("", "ops.csv")
    assert str(empty.value) == "ops.csv: the header must be model,input,cached_input,output,valid_from"
    missing = tmp_path / "missing.csv"
    with pytest.raises(PriceFileError) as unreadable:
        load_prices(missing)
    assert str(unreadable.value) == f"{missing}: cannot be read (FileNotFoundError)"


def test_without_an_operators_file_the_shipped_prices_apply() -> None:
    usage = TokenUsage(input_tokens=1000, output_tokens=500)
    assert load_prices().cost("gpt-4o", usage, NOW) == Cost(7500, PRICE_VERSION, CostBasis.PRICED)


def test_cost_of_prices_on_the_given_day(monkeypatch: pytest.MonkeyPatch) -> None:
    table = PriceTable(
        [row("m", "2020-01-01", "$1.00", "$1.00", "$1.00"), row("m", "2021-01-01", "$2.00", "$2.00", "$2.00")]
    )
    monkeypatch.setattr(pricing, "default_table", lambda: table)
    usage = TokenUsage(input_tokens=1_000_000)
    assert cost_of("m", usage, datetime(2020, 6, 1, tzinfo=UTC)) == Cost(
        1_000_000, "2020-01-01", CostBasis.PRICED
    )
