"""Money amounts and prices: exact integer micro-units, rounding once per request, 4-decimal display."""

from __future__ import annotations

import pytest

from qwen_gateway.service.money.prices import (
    InvalidAmount,
    Price,
    cost_micro,
    format_exact,
    format_money,
    parse_amount,
    price_per_1k,
    to_micro,
)


@pytest.mark.parametrize(
    ("value", "micro"),
    [(0.00015, 150), ("0.00015", 150), (0.0025, 2500), (1, 1_000_000), ("12.5", 12_500_000), (0.1, 100_000)],
)
def test_amounts_are_exact_micro_units(value: float | str, micro: int) -> None:
    assert to_micro(value) == micro


@pytest.mark.parametrize("value", ["0.0000001", "abc", "nan", "inf", "1e30"])
def test_unrepresentable_amounts_are_refused(value: str) -> None:
    with pytest.raises(InvalidAmount):
        to_micro(value)


def test_user_amounts_must_be_positive() -> None:
    assert parse_amount("100") == 100_000_000
    for bad in ("0", "-1"):
        with pytest.raises(InvalidAmount):
            parse_amount(bad)


def test_cost_rounds_up_once_per_request() -> None:
    price = price_per_1k(0.00015, 0.0015)  # qwen-flash: 150 and 1500 µCNY per 1K tokens
    assert price == Price(150, 1500)
    # 7 * 150 + 20 * 1500 = 31050 µCNY per 1K -> 31.05 µCNY -> 32.
    assert cost_micro(price, 7, 20) == 32
    assert cost_micro(price, 0, 0) == 0
    assert cost_micro(Price(1000, 2000), 3, 4) == 11  # whole micro-units stay exact


def test_display_has_four_decimals_truncated() -> None:
    assert format_money(123_016_512) == "123.0165"
    assert format_money(123_016_599) == "123.0165"  # never shown larger than it is
    assert format_money(0) == "0.0000"
    assert format_money(5) == "0.0000"
    assert format_exact(123_016_512) == "123.016512"
