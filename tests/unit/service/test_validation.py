"""Wire dict -> ChatCall, without a server: the mappings that don't show in an HTTP answer."""

from __future__ import annotations

from typing import Any

import pytest

from qwen_gateway.engines.base import Thinking
from qwen_gateway.errors import InvalidParameter
from qwen_gateway.service.models import ModelRegistry, ServedModel
from qwen_gateway.service.validation import ChatCall, build_call
from qwen_gateway.settings import ModelConfig
from tests.fakes import FaultyEngine

MSG = [{"role": "user", "content": "hi"}]


def registry(**config: Any) -> ModelRegistry:
    engine = FaultyEngine(fail=False)
    cfg = ModelConfig(id="qwen-plus", engine="fake", **config)
    return ModelRegistry([ServedModel.build(cfg, engine)])  # type: ignore[arg-type]


def call(models: ModelRegistry | None = None, **body: Any) -> ChatCall:
    return build_call({"model": "qwen-plus", "messages": MSG, **body}, models or registry(), request_id="r")


@pytest.mark.parametrize(("top_k", "expected"), [(None, None), (0, 0), (1000, 0), (5, 5), (100, 100)])
def test_top_k_zero_or_over_100_disables_it(top_k: int | None, expected: int | None) -> None:
    # None means "the checkpoint's default"; 0 means "no top-k filtering" to the engine.
    body = {} if top_k is None else {"top_k": top_k}
    assert call(**body).generation.sampling.top_k == expected


def test_model_config_defaults_fill_only_what_the_request_leaves_out() -> None:
    models = registry(temperature=0.0, top_p=0.5, top_k=7, repetition_penalty=1.2)
    s = call(models).generation.sampling
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (0.0, 0.5, 7, 1.2)
    s = call(models, temperature=0.9, top_p=0.9, top_k=0, repetition_penalty=1.0).generation.sampling
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (0.9, 0.9, 0, 1.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", "0.5"),
        ("temperature", True),
        ("max_tokens", True),
        ("max_tokens", "5"),
        ("max_tokens", 5.0),
        ("n", True),
        ("seed", True),
        ("stream", "true"),
        ("stream", 1),
        ("enable_thinking", 1),
        ("logprobs", 1),
    ],
)
def test_types_are_strict(field: str, value: Any) -> None:
    with pytest.raises(InvalidParameter) as info:
        call(**{field: value})
    assert info.value.param == field


def test_ints_are_fine_where_floats_go() -> None:
    assert call(temperature=1, top_p=1).generation.sampling.temperature == 1.0


def test_deeply_nested_tool_schema_is_refused() -> None:
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(100):
        deep = {"a": deep}
    tool = {"type": "function", "function": {"name": "f", "parameters": deep}}
    with pytest.raises(InvalidParameter) as info:
        call(tools=[tool])
    assert info.value.param == "tools.0"


def test_tool_choice_must_name_a_given_tool() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    for choice in ({"type": "function", "function": {"name": "g"}}, {}):
        with pytest.raises(InvalidParameter) as info:
            call(tools=[tool], tool_choice=choice)
        assert info.value.param == "tool_choice"


@pytest.mark.parametrize("stop", [[-5], [[99999999999]]])
def test_stop_token_ids_must_be_token_ids(stop: Any) -> None:
    with pytest.raises(InvalidParameter) as info:
        call(stop=stop)
    assert info.value.param == "stop"


def test_user_content_of_empty_text_parts_is_empty() -> None:
    with pytest.raises(InvalidParameter) as info:
        call(messages=[{"role": "user", "content": [{"type": "text", "text": ""}]}])
    assert info.value.param == "messages.0.content"


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def test_tools_an_engine_cannot_read_calls_from_are_refused_not_ignored() -> None:
    # The fake's capabilities name no tool-call markup: the model's calls could not be parsed.
    with pytest.raises(InvalidParameter) as info:
        call(tools=[TOOL])
    assert info.value.param == "tools"
    assert call(tools=[TOOL], tool_choice="none").generation.tools == ()


def test_past_reasoning_is_dropped_and_tool_turns_must_follow_calls() -> None:
    history = [*MSG, {"role": "assistant", "content": "ok", "reasoning_content": "thought"}, *MSG]
    assert all(m.reasoning_content is None for m in call(messages=history).generation.messages)
    with pytest.raises(InvalidParameter) as info:
        call(messages=[*MSG, {"role": "tool", "content": "18", "tool_call_id": "call_1"}])
    assert info.value.param == "messages.1.role"


def test_thinking_budget_defaults_to_the_models_reasoning_length() -> None:
    models = registry(supports_thinking=True, max_reasoning=100)
    assert call(models, enable_thinking=True, stream=True).generation.thinking == Thinking(True, 100)
    assert call(models, enable_thinking=False).generation.thinking == Thinking(False, None)
    # A budget the request sets on an engine that can't enforce one is refused by name.
    with pytest.raises(InvalidParameter) as info:
        call(models, enable_thinking=True, stream=True, thinking_budget=7)
    assert info.value.param == "thinking_budget"


def test_the_engine_is_told_whether_the_client_streams() -> None:
    # An engine may produce a whole answer at once for a non-stream call (the openai engine then asks
    # its upstream for one JSON answer).
    assert call().generation.stream is False
    assert call(stream=True).generation.stream is True
