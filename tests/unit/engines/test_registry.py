"""The registry checks a built-in engine's options without importing the engine itself."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qwen_gateway.engines.registry import CONFIG_MODELS, ENGINES, import_from_string, typed_config
from qwen_gateway.errors import StartupError
from qwen_gateway.settings import ModelConfig


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_each_builtin_engine_declares_its_option_model_torch_free(name: str) -> None:
    # The same class the engine itself declares, so checking a config early checks what the engine
    # will be built with.
    assert import_from_string(CONFIG_MODELS[name]) is import_from_string(ENGINES[name]).config_model


def test_checking_a_local_entry_imports_neither_torch_nor_the_engine() -> None:
    code = (
        "import sys\n"
        "from qwen_gateway.settings import ModelConfig\n"
        "from qwen_gateway.engines.registry import typed_config\n"
        "typed_config(ModelConfig(id='qwen-plus', engine='local', path='/x', max_batch_size=4))\n"
        "print(sorted(m for m in ('torch', 'transformers', 'qwen_gateway.engines.local.engine')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        # An entry-level rule (several options together) reads as the entry's own error.
        ({}, "model 'qwen-max': give exactly one of base_url or replicas"),
        # An option's own check: named, with its validator's message (no pydantic "Value error, ").
        (
            {"base_url": "http://h/v1", "breaker_failures": 0},
            "model 'qwen-max': invalid option breaker_failures: Input should be greater than or equal to 1",
        ),
    ],
)
def test_an_invalid_entry_is_one_readable_line(options: dict[str, object], message: str) -> None:
    with pytest.raises(StartupError) as error:
        typed_config(ModelConfig(id="qwen-max", engine="openai", **options))
    assert str(error.value) == message
