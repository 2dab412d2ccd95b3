"""Prices and money amounts: integer micro-units of CNY (1 CNY = 1_000_000), never floats.

Prices are CNY per 1K tokens (catalog, ``[[models]] input_price/output_price``) and become integer
micro-CNY per 1K tokens, exactly: a price with more than 6 decimals can't be represented and stops the
server at startup instead of being rounded silently. A request's cost is
``ceil((prompt * input + completion * output) / 1000)`` micro-CNY: rounded up once per request, so a
sum of costs is exact and a request never costs less than its tokens.

Amounts are shown with 4 decimals, as the reseller of seed 003 shows ``X-Account-Balance: 123.0165``
(truncated toward zero: a balance is never shown larger than it is).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

MICRO_PER_UNIT = 1_000_000
# Largest amount accepted from a user (CLI, admin API): far above any real balance, far below 2**63.
MAX_AMOUNT_MICRO = 10**15 * MICRO_PER_UNIT // 1000


class InvalidAmount(ValueError):
    """A money amount that is not a number with at most 6 decimals (or out of range)."""


@dataclass(frozen=True, slots=True)
class Price:
    """Micro-CNY per 1K tokens."""

    input_per_1k: int
    output_per_1k: int

    @property
    def free(self) -> bool:
        return self.input_per_1k == 0 and self.output_per_1k == 0


def to_micro(value: float | int | str | Decimal) -> int:
    """An amount in CNY as exact micro-units; a float is read through its shortest decimal text
    (``0.00015`` is 150, not the binary value's 149.99999...). Refuses more than 6 decimals."""
    try:
        amount = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value).strip())
    except InvalidOperation:
        raise InvalidAmount(f"{value!r} is not a number") from None
    if not amount.is_finite():
        raise InvalidAmount(f"{value!r} is not a finite number")
    micro = amount * MICRO_PER_UNIT
    if micro != micro.to_integral_value():
        raise InvalidAmount(f"{value} has more than 6 decimals (the smallest unit is 0.000001)")
    if abs(micro) > MAX_AMOUNT_MICRO:
        raise InvalidAmount(f"{value} is out of range")
    return int(micro)


def parse_amount(text: str) -> int:
    """A positive amount typed by a user (``100``, ``12.5``) in micro-units."""
    micro = to_micro(text)
    if micro <= 0:
        raise InvalidAmount(f"{text} must be positive")
    return micro


def price_per_1k(input_price: float, output_price: float) -> Price:
    """Catalog/config prices (CNY per 1K tokens) as a :class:`Price`; raises :class:`InvalidAmount`."""
    prices = (to_micro(input_price), to_micro(output_price))
    if min(prices) < 0:
        raise InvalidAmount("a price can't be negative")
    return Price(*prices)


def cost_micro(price: Price, prompt_tokens: int, completion_tokens: int) -> int:
    """What ``prompt_tokens`` in and ``completion_tokens`` out cost, rounded up to the micro-unit."""
    per_1k = prompt_tokens * price.input_per_1k + completion_tokens * price.output_per_1k
    return -(-per_1k // 1000)


def format_money(micro: int) -> str:
    """``123016512`` -> ``"123.0165"``: 4 decimals, truncated toward zero."""
    sign = "-" if micro < 0 else ""
    whole, rest = divmod(abs(micro), MICRO_PER_UNIT)
    return f"{sign}{whole}.{rest // 100:04d}"


def format_exact(micro: int) -> str:
    """Every digit (6 decimals), for reports whose sums must add up exactly."""
    sign = "-" if micro < 0 else ""
    whole, rest = divmod(abs(micro), MICRO_PER_UNIT)
    return f"{sign}{whole}.{rest:06d}"
