"""Every catalog price is a whole number of micro-CNY per 1K tokens (or startup would refuse it)."""

from __future__ import annotations

from qwen_gateway.service.catalog import builtin_spec, catalog_ids
from qwen_gateway.service.money.prices import price_per_1k


def test_every_catalog_price_converts_exactly() -> None:
    for model_id in catalog_ids():
        spec = builtin_spec(model_id)
        assert spec is not None
        price = price_per_1k(spec.input_price, spec.output_price)
        assert price.input_per_1k == round(spec.input_price * 1_000_000), model_id
        assert price.output_per_1k == round(spec.output_price * 1_000_000), model_id
    # Seed 003's list: qwen-plus at 0.0025 CNY per 1K tokens.
    assert price_per_1k(0.0025, 0.0025).input_per_1k == 2500
