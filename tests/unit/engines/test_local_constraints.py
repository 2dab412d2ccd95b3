"""The local engine's output constraints (xgrammar) and logprobs, driven straight through LocalEngine."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest

from qwen_gateway.engines.base import JsonConstraint, ToolCallConstraint, ToolSpec
from qwen_gateway.engines.local import constraints
from qwen_gateway.errors import InvalidParameter
from tests.unit.engines.local_helpers import answer, collect, request, run, text_of

SCHEMA = {
    "type": "object",
    "properties": {
        "a": {"type": "string", "maxLength": 6},
        "b": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(engine_factory: Callable[..., Any]) -> Any:
    return engine_factory()


def constrained(schema: dict[str, Any] | None = SCHEMA, **sampling: Any) -> Any:
    sampling.setdefault("max_tokens", 200)
    sampling.setdefault("temperature", 1.0)
    return dataclasses.replace(request(**sampling), constraint=JsonConstraint(schema))


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"a": {"not": {"type": "string"}}}},
        {"type": "array", "uniqueItems": True},
        {"type": "integer", "multipleOf": 3},
        {"type": "string", "pattern": "(?=a)b"},
        {"type": "string", "format": "hostname-idn"},
        {"oneOf": [{"type": "string"}, {"type": "integer"}]},
        {"type": "object", "properties": {"x": []}},
    ],
)
def test_keywords_the_grammar_would_not_enforce_are_refused(schema: dict[str, Any]) -> None:
    with pytest.raises(InvalidParameter) as info:
        constraints.check_schema(schema, "response_format")
    assert info.value.param == "response_format"


def test_enforced_keywords_pass() -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "T",
        "type": "object",
        "properties": {
            "a": {"allOf": [{"$ref": "#/$defs/A"}]},
            "b": {"anyOf": [{"type": "null"}, {"type": "string", "format": "date", "maxLength": 10}]},
        },
        "$defs": {"A": {"type": "array", "items": {"enum": [1, 2]}, "maxItems": 2}},
        "required": ["a"],
    }
    constraints.check_schema(schema, "response_format")


def test_output_validates_and_the_grammar_ends_the_answer(engine: Any) -> None:
    for seed in range(3):
        text, finished = run(answer(engine, constrained(seed=seed)))
        assert finished.reason == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)


def test_max_tokens_cuts_a_constrained_answer_with_length(engine: Any) -> None:
    full, _ = run(answer(engine, constrained(seed=4)))
    cut, finished = run(answer(engine, constrained(seed=4, max_tokens=3)))
    assert finished.reason == "length" and finished.usage.completion_tokens == 3
    assert full.startswith(cut) and cut != full


def test_a_constrained_row_leaves_its_batch_neighbours_alone(engine: Any) -> None:
    free = request(max_tokens=12, temperature=1.0, seed=7, request_id="free")
    alone, _ = run(answer(engine, free))

    async def together() -> list[str]:
        results = await asyncio.gather(
            answer(engine, free),
            answer(engine, constrained(seed=8, request_id="c1")),
            answer(engine, constrained({"type": "object", "properties": {"z": {"enum": ["q"]}}}, seed=9)),
        )
        return [text for text, _ in results]

    texts = run(together())
    assert texts[0] == alone
    jsonschema.validate(json.loads(texts[1]), SCHEMA)


def test_tool_call_grammar_uses_the_special_tags(engine: Any) -> None:
    tool = ToolSpec(
        "lookup", None, {"type": "object", "properties": {"q": {"type": "string", "maxLength": 5}}}
    )
    req = dataclasses.replace(
        request(max_tokens=100, temperature=1.0, seed=3, tools=(tool,)),
        constraint=ToolCallConstraint("lookup"),
    )
    deltas, finished = run(collect(engine.generate(req)))
    text = text_of(deltas)
    assert text.startswith('<tool_call>\n{"name": "lookup", "arguments": {') and text.endswith(
        "}\n</tool_call>"
    )
    assert json.loads(text[len("<tool_call>\n") : -len("\n</tool_call>")])["name"] == "lookup"
    marked = [token for d in deltas for _, token in (d.specials or ())]
    tags = [engine._loaded.tokenizer.convert_tokens_to_ids(t) for t in constraints.TOOL_TAGS]
    assert marked[:2] == tags  # one special token each, not the tags spelled out
    assert finished.reason == "stop"


def test_uncompilable_schema_is_a_400_naming_the_parameter(engine: Any) -> None:
    with pytest.raises(InvalidParameter) as info:
        run(answer(engine, constrained({"type": "foo"})))
    assert info.value.param == "response_format" and "cannot be compiled" in info.value.message
    # A bad regex: xgrammar's reason, without its log prefix (time, C++ source path and line).
    with pytest.raises(InvalidParameter) as info:
        run(answer(engine, constrained({"type": "string", "pattern": "(["})))
    message = info.value.message
    assert "cannot be compiled: " in message and "Regex" in message, message
    assert ".cc" not in message and "/project" not in message and not re.search(r"\[\d+:\d+", message)
    tool = ToolSpec("t", None, {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})
    req = dataclasses.replace(request(tools=(tool,)), constraint=ToolCallConstraint("t"))
    with pytest.raises(InvalidParameter) as info:
        run(answer(engine, req))
    assert info.value.param == "tool_choice"


def test_compiled_grammars_are_cached_with_a_bound(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    grammars = engine._grammars
    monkeypatch.setattr(constraints, "CACHE_ENTRIES", 3)
    for i in range(6):
        schema = {"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]}
        grammars.compile(JsonConstraint(schema), ())
        assert len(grammars) <= 3
    size = grammars.cached_bytes
    assert size > 0
    monkeypatch.setattr(constraints, "CACHE_BYTES", size - 1)  # one more entry must evict an older one
    grammars.compile(JsonConstraint({"type": "object", "properties": {"k0": {"type": "boolean"}}}), ())
    assert 0 < grammars.cached_bytes <= size - 1


def test_logprobs_for_one_row_only(engine: Any) -> None:
    free = request(max_tokens=10, temperature=1.0, seed=11, request_id="free")
    asked = request(max_tokens=10, temperature=1.0, seed=11, request_id="asked", logprobs=2)

    async def both() -> tuple[Any, Any]:
        return await asyncio.gather(collect(engine.generate(free)), collect(engine.generate(asked)))

    (free_deltas, _), (asked_deltas, finished) = run(both())
    assert text_of(free_deltas) == text_of(asked_deltas)  # reading logprobs changes no token
    assert all(not d.logprobs for d in free_deltas)
    entries = [e for d in asked_deltas for e in d.logprobs]
    assert len(entries) == finished.usage.completion_tokens - (1 if finished.reason == "stop" else 0)
    assert b"".join(bytes(e.bytes) for e in entries).decode() == text_of(asked_deltas)
    assert all(len(e.top) == 2 and e.top[0].logprob >= e.top[1].logprob for e in entries)


def test_bounded_strings_exclude_raw_control_characters(engine: Any) -> None:
    """xgrammar's own rule for minLength/maxLength strings lets a raw tab in (invalid JSON)."""
    import torch

    state = engine._grammars.compile(JsonConstraint({"type": "string", "maxLength": 4}), ())
    assert state.matcher.accept_string('"')
    bitmask = torch.zeros(1, (engine._grammars.vocab_size + 31) // 32, dtype=torch.int32)
    state.fill(bitmask, 0)
    tokenizer = engine._loaded.tokenizer
    for char in ("\t", "\x01", "\n"):
        token = tokenizer(char, add_special_tokens=False)["input_ids"][0]
        word, bit = divmod(token, 32)
        assert not int(bitmask[0, word]) >> bit & 1, repr(char)
    letter = tokenizer("a", add_special_tokens=False)["input_ids"][0]
    assert int(bitmask[0, letter // 32]) >> (letter % 32) & 1


@pytest.mark.parametrize("allowed_share", [0.0001, 0.01, 0.5, 0.99, 0.9999])
def test_cached_mask_plans_mask_exactly_like_the_kernel(allowed_share: float) -> None:
    import torch
    import xgrammar as xgr

    vocab = 151936
    gen = torch.Generator().manual_seed(int(allowed_share * 1e4))
    allowed = torch.rand(vocab, generator=gen) < allowed_share
    allowed[0] = True  # at least one token
    padded = torch.zeros((vocab + 31) // 32 * 32, dtype=torch.bool)
    padded[:vocab] = allowed
    weights = (1 << torch.arange(32, dtype=torch.int64)).view(1, 32)
    words = (padded.view(-1, 32).long() * weights).sum(1)
    bitmask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).view(1, -1)
    plans = constraints.MaskPlans(vocab)
    for _ in range(2):  # the miss that plans, then the hit that replays
        logits = torch.randn(1, vocab, generator=gen)
        expected = logits.clone()
        xgr.apply_token_bitmask_inplace(expected, bitmask)
        if not plans.apply(logits, bitmask, 0):
            xgr.apply_token_bitmask_inplace(logits, bitmask, indices=[0])
        assert torch.equal(logits, expected)
