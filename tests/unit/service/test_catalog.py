from __future__ import annotations

import re
from dataclasses import replace

import pytest

from qwen_gateway.engines.base import Capabilities
from qwen_gateway.service.catalog import ModelSpec, builtin_spec, catalog_ids, resolve_spec
from qwen_gateway.settings import ModelConfig
from tests.support import SHARED

SEEDS = SHARED / "seeds"


def _spec(model_id: str) -> ModelSpec:
    spec = builtin_spec(model_id)
    assert spec is not None, model_id
    return spec


def _seed_003_prices() -> dict[str, float]:
    text = next(SEEDS.glob("003_*.txt")).read_text()
    return {
        m[1]: float(m[2]) for m in re.finditer(r"^([a-z][\w.-]*) \S+ ([0-9.]+) \d{4}-\d{2}-\d{2}", text, re.M)
    }


def test_every_seed_003_model_is_in_the_catalog_at_its_listed_price() -> None:
    prices = _seed_003_prices()
    assert len(prices) >= 40
    for model_id, price in prices.items():
        spec = _spec(model_id)
        assert (spec.input_price, spec.output_price) == (price, price), model_id


def test_every_model_in_the_vision_seed_lists_resolves() -> None:
    ids: set[str] = set()
    for seed in ("000_*.txt", "001_*.txt"):
        text = next(SEEDS.glob(seed)).read_text()
        ids |= set(re.findall(r"\b(?:qwen3-vl|qwen-vl|qwen2\.5-vl|qwen2-vl|qvq)-[\w.-]*[\w]", text))
    assert {"qwen3-vl-flash-2025-10-15-us", "qwen-vl-ocr-2024-10-28", "qvq-max-2025-03-25"} <= ids
    for model_id in ids:
        spec = _spec(model_id)
        assert spec.id == model_id
        assert "image" in spec.modalities, model_id


@pytest.mark.parametrize(
    ("model_id", "base"),
    [
        ("qwen-plus-latest", "qwen-plus"),
        ("qwen-plus-2025-04-28", "qwen-plus"),
        ("qwen-max-0428", "qwen-max"),
        ("qwen-turbo-1101", "qwen-turbo"),
        ("qwen3-vl-flash-us", "qwen3-vl-flash"),
        ("qwen3-vl-flash-2025-10-15-us", "qwen3-vl-flash"),
        ("qvq-max-latest", "qvq-max"),
        ("qwen-vl-ocr-2025-11-20", "qwen-vl-ocr"),
        ("qwen3-max-2025-09-23", "qwen3-max"),
    ],
)
def test_snapshots_resolve_to_their_base_under_their_own_id(model_id: str, base: str) -> None:
    spec = _spec(model_id)
    assert spec.id == model_id
    assert spec == replace(_spec(base), id=model_id)


@pytest.mark.parametrize(
    "model_id",
    ["Qwen-Plus", "QWEN-PLUS", "qwen-plus ", "gpt-4o", "", "qwen-plus-1399", "-latest", "qwen-plus-latest-x"],
)
def test_unknown_and_wrongly_cased_ids_are_not_found(model_id: str) -> None:
    assert builtin_spec(model_id) is None


def test_generation_suffixes_are_not_mistaken_for_snapshots() -> None:
    thinking = _spec("qwen3-235b-a22b-thinking-2507")
    instruct = _spec("qwen3-235b-a22b-instruct-2507")
    assert thinking.thinking_fixed and thinking.thinking_default
    assert not instruct.supports_thinking
    assert builtin_spec("qwen3-235b-a22b-2507") is None


def test_qwen3_open_source_thinks_by_default_and_then_needs_streaming() -> None:
    for model_id in (
        "qwen3-235b-a22b",
        "qwen3-32b",
        "qwen3-30b-a3b",
        "qwen3-14b",
        "qwen3-8b",
        "qwen3-4b",
        "qwen3-1.7b",
        "qwen3-0.6b",
    ):
        spec = _spec(model_id)
        assert spec.family == "qwen3"
        assert spec.supports_thinking and spec.thinking_default and not spec.thinking_fixed
        assert not spec.stream_only
        assert spec.requires_stream(thinking=spec.thinking_enabled(None))
        assert not spec.requires_stream(thinking=spec.thinking_enabled(False))
        assert not spec.supports_search


def test_qwq_and_qvq_always_think_and_only_stream() -> None:
    for model_id in ("qwq-plus", "qwq-32b", "qvq-max", "qvq-plus"):
        spec = _spec(model_id)
        assert spec.stream_only
        assert spec.thinking_enabled(False)
        assert spec.requires_stream(thinking=False)
    assert _spec("qvq-max").family == "qvq"
    assert _spec("qwq-plus").family == "qwq"
    assert "video" in _spec("qvq-max").modalities


def test_max_reasoning_is_the_models_chain_of_thought_length() -> None:
    assert _spec("qwen3-8b").max_reasoning == 38_912
    assert _spec("qwq-plus").max_reasoning == 32_768
    assert _spec("qvq-max").max_reasoning == 16_384
    assert _spec("qwen-plus").max_reasoning == 81_920
    assert _spec("qwen-max").max_reasoning == 0  # no thinking, nothing to bound
    assert resolve_spec(ModelConfig(id="qwen3-8b", path="/m", max_reasoning=64), None).max_reasoning == 64
    # Never more than the context; a model switched to thinking by config gets its context.
    assert (
        resolve_spec(ModelConfig(id="qwq-plus", path="/m", context_length=4096), None).max_reasoning == 4096
    )
    switched = resolve_spec(ModelConfig(id="qwen-max", path="/m", supports_thinking=True), None)
    assert switched.max_reasoning == switched.context_length


def test_commercial_models() -> None:
    plus = _spec("qwen-plus")
    assert plus.supports_thinking and not plus.thinking_default
    assert plus.supports_search and plus.supports_tools and plus.supports_n
    assert plus.requires_stream(thinking=True) and not plus.requires_stream(thinking=False)
    assert plus.owned_by == "system"
    assert _spec("qwen-max").supports_thinking is False
    assert _spec("qwen3.5-plus").thinking_default is True
    assert _spec("qwen3.5-plus").modalities == frozenset({"text", "image", "video"})
    assert _spec("qwen-long").context_length >= 1_000_000
    assert _spec("qwen-mt-turbo").family == "qwen-mt"
    assert not _spec("qwen-mt-turbo").supports_tools


def test_every_entry_is_consistent() -> None:
    ids = catalog_ids()
    assert len(ids) == len(set(ids)) > 80
    for model_id in ids:
        spec = _spec(model_id)
        assert spec.max_input <= spec.context_length, model_id
        assert 0 < spec.max_output <= spec.context_length, model_id
        assert "text" in spec.modalities <= {"text", "image", "video", "audio"}, model_id
        assert spec.input_price > 0 and spec.output_price > 0, model_id
        assert not spec.thinking_default or spec.supports_thinking, model_id
        assert not spec.thinking_fixed or spec.thinking_default, model_id


def test_resolve_applies_every_override() -> None:
    config = ModelConfig(
        id="qwen-plus",
        path="/m",
        family="custom",
        context_length=8192,
        max_output=48,
        thinking_default=True,
        stream_only=True,
        input_price=0.5,
        output_price=1.5,
    )
    spec = resolve_spec(config, None)
    assert spec.id == "qwen-plus"
    assert (spec.family, spec.context_length, spec.max_output) == ("custom", 8192, 48)
    assert spec.max_input <= 8192
    assert spec.thinking_default and spec.supports_thinking and spec.stream_only
    assert (spec.input_price, spec.output_price) == (0.5, 1.5)
    assert spec.supports_search  # untouched fields keep the catalog's values


def test_resolve_without_overrides_is_the_catalog_entry() -> None:
    assert resolve_spec(ModelConfig(id="qwen-plus-latest", path="/m"), None) == _spec("qwen-plus-latest")


def test_overrides_can_switch_thinking_and_streaming_off() -> None:
    spec = resolve_spec(
        ModelConfig(id="qwq-plus", path="/m", supports_thinking=False, stream_only=False), None
    )
    assert not spec.supports_thinking and not spec.thinking_default and not spec.thinking_fixed
    assert not spec.requires_stream(thinking=spec.thinking_enabled(None))

    spec = resolve_spec(ModelConfig(id="qwen3-8b", path="/m", thinking_default=False), None)
    assert spec.supports_thinking and not spec.thinking_enabled(None)
    spec = resolve_spec(ModelConfig(id="qwen3-8b", path="/m", stream_only=False), None)
    assert not spec.requires_stream(thinking=True)


def test_a_larger_context_override_lifts_the_input_limit() -> None:
    spec = resolve_spec(ModelConfig(id="qwen-max", path="/m", context_length=65_536), None)
    assert spec.context_length == spec.max_input == 65_536
    assert spec.max_output == _spec("qwen-max").max_output


def test_the_engine_context_clamps_the_catalog() -> None:
    caps = Capabilities(max_context=4096, max_output=1024)
    spec = resolve_spec(ModelConfig(id="qwen-plus", path="/m"), caps)
    assert (spec.context_length, spec.max_input, spec.max_output) == (4096, 4096, 1024)
    spec = resolve_spec(ModelConfig(id="qwen-plus", path="/m", context_length=1_000_000), caps)
    assert spec.context_length == 4096
    # A bigger engine doesn't raise the catalog's limits.
    big = resolve_spec(ModelConfig(id="qwen-max", path="/m"), Capabilities(max_context=1_000_000))
    assert (big.context_length, big.max_output) == (32_768, 8_192)


def test_unknown_ids_are_derived_from_the_engine() -> None:
    caps = Capabilities(max_context=8192, max_output=None, tools=False)
    config = ModelConfig(id="smollm2-135m-instruct", path="/m", embedded=True)
    spec = resolve_spec(config, caps)
    assert spec.id == "smollm2-135m-instruct"
    assert (spec.context_length, spec.max_input, spec.max_output) == (8192, 8192, 8192)
    assert spec.modalities == frozenset({"text"})
    assert not spec.supports_thinking and not spec.stream_only and not spec.supports_search
    assert not spec.supports_tools and spec.supports_n
    assert (spec.input_price, spec.output_price, spec.owned_by) == (0.0, 0.0, "qwen-gateway")

    vision = resolve_spec(
        ModelConfig(id="my-vl", path="/m", output_price=0.01),
        Capabilities(max_context=32_768, max_output=2048, vision=True, video=True, reasoning=True),
    )
    assert vision.modalities == frozenset({"text", "image", "video"})
    assert vision.max_output == 2048
    assert vision.supports_thinking and not vision.thinking_default
    assert vision.output_price == 0.01

    unstarted = resolve_spec(ModelConfig(id="my-model", path="/m", context_length=2048), None)
    assert unstarted.context_length == unstarted.max_input == 2048
