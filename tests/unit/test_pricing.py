"""Cost arithmetic: cached and reasoning tokens, model-name matching, rounding, unknown models."""

from __future__ import annotations

import logging
import re
import uuid

import pytest

from chatgate_server.domain import Cost, TokenUsage
from chatgate_server.usage.pricing import PRICE_VERSION, PRICES, ModelPrice, cost_of, price_of


def test_plain_input_and_output_at_list_price() -> None:
    # gpt-4o: $2.50 in, $10.00 out per 1M → 1000 in + 500 out = $0.0025 + $0.005.
    cost = cost_of("gpt-4o", TokenUsage(input_tokens=1000, output_tokens=500))
    assert cost == Cost(usd_micros=7500, price_version=PRICE_VERSION)


def test_cached_input_is_priced_at_the_cached_rate_and_not_again_as_input() -> None:
    # 600 uncached × $2.50 + 400 cached × $1.25 per 1M = 1500 + 500 micro-dollars.
    # (Cached also billed as input would be 3000; cached ignored would be 2500.)
    usage = TokenUsage(input_tokens=1000, cached_input_tokens=400)
    assert cost_of("gpt-4o", usage).usd_micros == 2000


def test_reasoning_tokens_are_output_and_not_added_again() -> None:
    # o3 output $8.00 per 1M: 1000 output tokens of which 800 reasoning = 8000 micro-dollars.
    usage = TokenUsage(input_tokens=0, output_tokens=1000, reasoning_tokens=800)
    assert cost_of("o3", usage).usd_micros == 8000


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


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-11-20", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("o3-2025-04-16", "o3"),
        ("gpt-5-nano-2025-08-07", "gpt-5-nano"),
        ("gpt-5-pro-2025-10-06", "gpt-5-pro"),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),
    ],
)
def test_dated_snapshots_resolve_to_the_longest_matching_family(model: str, family: str) -> None:
    assert price_of(model) == PRICES[family]
    usage = TokenUsage(input_tokens=123_457, output_tokens=7_891, cached_input_tokens=1_024)
    assert cost_of(model, usage) == cost_of(family, usage)


def test_a_longer_family_is_not_priced_as_its_shorter_prefix() -> None:
    # The mini models must not fall back to the big model's (higher) price.
    assert price_of("gpt-4o-mini-2024-07-18") != PRICES["gpt-4o"]
    assert price_of("gpt-5-pro") != PRICES["gpt-5"]
    # The launch snapshot of gpt-4o kept its own price.
    assert price_of("gpt-4o-2024-05-13") != PRICES["gpt-4o"]


@pytest.mark.parametrize("model", ["gpt-5.1", "gpt-4omni", "gpt", "claude-3-opus", "", "o", "4o"])
def test_prefix_matching_stops_at_a_hyphen_boundary(model: str) -> None:
    assert price_of(model) is None


def test_unknown_model_costs_none_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    model = f"mystery-model-{uuid.uuid4().hex[:8]}"
    other = f"other-model-{uuid.uuid4().hex[:8]}"
    with caplog.at_level(logging.WARNING, logger="chatgate_server.usage.pricing"):
        first = cost_of(model, TokenUsage(input_tokens=10, output_tokens=10))
        second = cost_of(model, TokenUsage(input_tokens=99))
        cost_of(other, TokenUsage())
    assert first == Cost(usd_micros=None, price_version=PRICE_VERSION)
    assert second == Cost(usd_micros=None, price_version=PRICE_VERSION)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum(model in w for w in warnings) == 1
    assert sum(other in w for w in warnings) == 1


def test_zero_usage_costs_zero_not_none() -> None:
    assert cost_of("gpt-4o", TokenUsage()) == Cost(usd_micros=0, price_version=PRICE_VERSION)


def test_inconsistent_counts_are_clamped_not_trusted() -> None:
    # More cached than input (a broken upstream report): never priced below zero
    # uncached tokens, never a crash.
    usage = TokenUsage(input_tokens=100, cached_input_tokens=500, output_tokens=-5)
    assert (
        cost_of("gpt-4o", usage).usd_micros
        == cost_of("gpt-4o", TokenUsage(input_tokens=100, cached_input_tokens=100)).usd_micros
    )
    assert cost_of("gpt-4o", usage).usd_micros == 125  # 100 × $1.25 per 1M


@pytest.mark.parametrize(
    ("family", "input_usd_micros", "cached_usd_micros", "output_usd_micros"),
    [
        ("gpt-4o", 2_500_000, 1_250_000, 10_000_000),
        ("gpt-4o-mini", 150_000, 75_000, 600_000),
        ("gpt-4.1", 2_000_000, 500_000, 8_000_000),
        ("gpt-4.1-mini", 400_000, 100_000, 1_600_000),
        ("gpt-4.1-nano", 100_000, 25_000, 400_000),
        ("o3", 2_000_000, 500_000, 8_000_000),
        ("o4-mini", 1_100_000, 275_000, 4_400_000),
        ("gpt-5", 1_250_000, 125_000, 10_000_000),
        ("gpt-5-mini", 250_000, 25_000, 2_000_000),
        ("gpt-5-nano", 50_000, 5_000, 400_000),
    ],
)
def test_common_models_carry_their_list_prices(
    family: str, input_usd_micros: int, cached_usd_micros: int, output_usd_micros: int
) -> None:
    assert PRICES[family] == ModelPrice(input_usd_micros, cached_usd_micros, output_usd_micros)


def test_price_table_is_consistent() -> None:
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", PRICE_VERSION)
    for model, price in PRICES.items():
        assert model == model.strip().lower()
        for value in (price.input, price.cached_input, price.output):
            assert type(value) is int
            assert value > 0
        assert price.cached_input <= price.input, model
