"""The native request maps onto the same ChatCall as compatible mode (same engine request), with
DashScope's per-family defaults for result_format and incremental_output, and the translation
prompt builder's rules."""

from __future__ import annotations

from typing import Any

import pytest

from qwen_gateway.engines.base import Capabilities
from qwen_gateway.errors import InvalidParameter, MissingField
from qwen_gateway.service.models import ModelRegistry, ServedModel
from qwen_gateway.service.requests.native import NativeCall, build_native_call
from qwen_gateway.service.translation import translation_prompt
from qwen_gateway.service.validation import build_call
from qwen_gateway.settings import ModelConfig
from tests.fakes import FaultyEngine

MSG = [{"role": "user", "content": "hi"}]


class SeeingEngine(FaultyEngine):
    """The fake engine, declaring vision: only validation runs here, nothing generates."""

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(max_context=1024, vision=True, video=True)


def registry(*ids: str) -> ModelRegistry:
    return ModelRegistry(
        [
            ServedModel.build(ModelConfig(id=i, engine="fake"), SeeingEngine(fail=False))
            for i in ids or ("qwen-plus",)
        ]  # type: ignore[arg-type]
    )


def native(
    body: dict[str, Any], *, models: ModelRegistry | None = None, stream: bool = False, mm: bool = False
) -> NativeCall:
    return build_native_call(body, models or registry(), request_id="r", multimodal=mm, stream=stream)


def test_native_and_compat_build_the_same_engine_request() -> None:
    params = {
        "temperature": 0.3,
        "top_p": 0.7,
        "top_k": 20,
        "seed": 5,
        "max_tokens": 9,
        "stop": ["x"],
        "repetition_penalty": 1.1,
        "presence_penalty": 0.5,
    }
    models = registry()
    n = native({"model": "qwen-plus", "input": {"messages": MSG}, "parameters": params}, models=models)
    c = build_call({"model": "qwen-plus", "messages": MSG, **params}, models, request_id="r")
    assert n.chat.generation == c.generation
    assert n.result_format == "text" and n.incremental is False


def test_multimodal_parts_map_to_the_same_parts() -> None:
    content = [{"image": "https://example.com/a.png", "max_pixels": 1000}, {"text": "what?"}]
    models = registry("qwen-vl-max")
    n = native(
        {"model": "qwen-vl-max", "input": {"messages": [{"role": "user", "content": content}]}},
        models=models,
        mm=True,
    )
    c = build_call(
        {
            "model": "qwen-vl-max",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {"url": "https://example.com/a.png", "max_pixels": 1000},
                        },
                        {"type": "text", "text": "what?"},
                    ],
                }
            ],
        },
        models,
        request_id="r",
    )
    assert n.chat.media == c.media and n.chat.generation == c.generation
    assert n.result_format == "message"


@pytest.mark.parametrize(
    ("part", "param"),
    [
        ({"text": "a", "image": "https://x/y.png"}, "input.messages.0.content.0"),
        ({"audio": "https://x/y.wav"}, "input.messages.0.content.0.audio"),
        ({"video": ["https://x/1.png"] * 4, "max_pixels": 5}, "input.messages.0.content.0"),
    ],
)
def test_bad_parts_are_named_by_native_path(part: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidParameter) as err:
        native(
            {"model": "qwen-vl-max", "input": {"messages": [{"role": "user", "content": [part]}]}},
            models=registry("qwen-vl-max"),
            mm=True,
        )
    assert err.value.param == param


def test_errors_of_the_shared_validation_name_native_paths() -> None:
    with pytest.raises(InvalidParameter) as err:
        native({"model": "qwen-plus", "input": {"messages": MSG}, "parameters": {"temperature": 3.0}})
    assert err.value.param == "parameters.temperature"
    with pytest.raises(InvalidParameter) as err:
        native({"model": "qwen-plus", "input": {"messages": [{"role": "robot", "content": "x"}]}})
    assert err.value.param == "input.messages.0.role"


def test_missing_parts_use_dashscopes_codes() -> None:
    with pytest.raises(MissingField) as err:
        native({"input": {"messages": MSG}})
    assert err.value.native_code == "BadRequest.EmptyModel"
    with pytest.raises(MissingField) as err:
        native({"model": "qwen-plus", "input": {}})
    assert err.value.native_code == "BadRequest.EmptyInput"
    with pytest.raises(InvalidParameter) as err:
        native({"model": "qwen-plus", "input": {"prompt": "a", "messages": MSG}})
    assert err.value.param == "input.prompt"


def test_family_defaults() -> None:
    models = registry("qwen-plus", "qwen3-8b", "qwq-plus", "qwen-long")
    body = {"input": {"messages": MSG}, "parameters": {"enable_thinking": False}}
    assert native({**body, "model": "qwen3-8b"}, models=models, stream=True).result_format == "message"
    assert native({**body, "model": "qwen3-8b"}, models=models, stream=True).incremental is True
    assert (
        native({"model": "qwen-long", "input": {"messages": MSG}}, models=models).result_format == "message"
    )
    assert (
        native({"model": "qwq-plus", "input": {"messages": MSG}}, models=models, stream=True).incremental
        is True
    )
    with pytest.raises(InvalidParameter) as err:
        native(
            {"model": "qwq-plus", "input": {"messages": MSG}, "parameters": {"incremental_output": False}},
            models=models,
            stream=True,
        )
    assert err.value.param == "parameters.incremental_output"
    with pytest.raises(InvalidParameter) as err:
        native(
            {"model": "qwq-plus", "input": {"messages": MSG}, "parameters": {"result_format": "text"}},
            models=models,
            stream=True,
        )
    assert err.value.param == "parameters.result_format"


def test_translation_prompt_carries_every_option() -> None:
    prompt = translation_prompt(
        "博客园的理念",
        {
            "source_lang": "chinese",
            "target_lang": "English",
            "terms": [{"source": "博客园", "target": "cnblogs"}],
            "tm_list": [{"source": "理念", "target": "concept"}],
            "domains": "A promotion.",
        },
    )
    assert "Chinese text" in prompt and "into English" in prompt
    assert "博客园 -> cnblogs" in prompt and "理念 -> concept" in prompt and "A promotion." in prompt
    assert prompt.endswith("博客园的理念")
    assert "Translate the text below" in translation_prompt(
        "x", {"source_lang": "AUTO", "target_lang": "french"}
    )


def test_translation_replaces_the_one_user_message() -> None:
    models = registry("qwen-mt-turbo")
    options = {"source_lang": "auto", "target_lang": "Japanese"}
    n = native(
        {
            "model": "qwen-mt-turbo",
            "input": {"messages": MSG},
            "parameters": {"translation_options": options},
        },
        models=models,
    )
    [message] = n.chat.generation.messages
    assert message.role == "user" and message.content == translation_prompt("hi", options)
    parts = [{"role": "user", "content": [{"text": "h"}, {"text": "i"}]}]
    n = native(
        {
            "model": "qwen-mt-turbo",
            "input": {"messages": parts},
            "parameters": {"translation_options": options},
        },
        models=models,
    )
    assert n.chat.generation.messages[0].content == translation_prompt("hi", options)
