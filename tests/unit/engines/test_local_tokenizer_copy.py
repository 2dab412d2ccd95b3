"""The render tokenizer's copy (tokenizer_copy.copy_tokenizer): its Rust tokenizer is rebuilt from the
vocabulary and merges the original was built from, and is the same tokenizer as the original's, down to
its serialised JSON, for every checkpoint's tokenizer; anything the checks cannot vouch for falls back to
a deep copy."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoTokenizer

from qwen_gateway.engines.local.tokenizer_copy import _rebuilt_backend, copy_tokenizer
from tests.support import MODELS

# The VL checkpoints' tokenizers are Qwen2's too (with the vision tokens added): slow, so the quick run
# checks the two text families and the full suite every checkpoint.
CHECKPOINTS = [
    "tiny-qwen2.5",
    "tiny-qwen3",
    *(
        pytest.param(name, marks=pytest.mark.slow)
        for name in ("tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl")
    ),
]


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_the_copy_is_the_same_tokenizer_built_from_the_shared_vocabulary(checkpoint: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(MODELS / checkpoint)
    rebuilt = _rebuilt_backend(tokenizer, tokenizer._tokenizer)
    assert rebuilt is not None  # the fast path, not the deep copy's JSON round trip
    assert rebuilt.to_str() == tokenizer._tokenizer.to_str()

    twin = copy_tokenizer(tokenizer)
    assert twin._tokenizer is not tokenizer._tokenizer
    assert twin._tokenizer.to_str() == tokenizer._tokenizer.to_str()
    assert twin._vocab is tokenizer._vocab and twin._merges is tokenizer._merges
    messages = [{"role": "user", "content": "Bonjour, 世界! <|im_end|> 123"}]
    assert twin.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )
    text = "Hello <|endoftext|> wörld\n\tdef f(): return 42"
    assert twin(text)["input_ids"] == tokenizer(text)["input_ids"]
    # Settings are its own: truncation set on the copy leaves the original as it was.
    twin._tokenizer.enable_truncation(max_length=3)
    assert tokenizer._tokenizer.truncation is None
    assert len(tokenizer(text)["input_ids"]) > 3


def test_a_placeholder_vocabulary_or_other_merges_fall_back_to_the_deep_copy() -> None:
    tokenizer = AutoTokenizer.from_pretrained(MODELS / "tiny-qwen2.5")
    # A GGUF load leaves the constructor's placeholder vocabulary beside a finished backend.
    placeholder = copy.copy(tokenizer)
    placeholder._vocab = {"<|endoftext|>": 0}
    assert _rebuilt_backend(placeholder, tokenizer._tokenizer) is None
    # Merges that are not the backend's: the probe's encoding differs.
    other = copy.copy(tokenizer)
    other._merges = tokenizer._merges[: len(tokenizer._merges) // 2]
    assert _rebuilt_backend(other, tokenizer._tokenizer) is None
    # And the copy made from such a tokenizer is still the backend's own (a deep copy).
    twin = copy_tokenizer(other)
    assert twin._tokenizer is not tokenizer._tokenizer
    assert twin._tokenizer.to_str() == tokenizer._tokenizer.to_str()
