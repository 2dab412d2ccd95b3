"""[[models]] entries on one checkpoint share its tokenizers (loader.Tokenizers, through the registry's
SharedLoads), with their locks; their answers are the ones an engine with tokenizers of its own gives,
also when both engines render, decode and tokenize at once (a fast tokenizer used from two threads
outside one lock can raise "Already borrowed")."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from qwen_gateway.engines.base import JsonConstraint
from qwen_gateway.engines.local import LocalEngine
from qwen_gateway.engines.registry import SharedLoads
from qwen_gateway.service.models import ModelRegistry
from qwen_gateway.settings import ModelConfig, Settings
from tests.unit.engines.local_helpers import QWEN3, QWEN25, answer, request, run

PROMPTS = [f"Tell me about the number {i}, and the sea." * (1 + i % 3) for i in range(12)]


def constrained_request(schema: dict[str, Any]) -> Any:
    base = request("Answer in JSON.", max_tokens=40, temperature=0.0)
    return dataclasses.replace(base, constraint=JsonConstraint(schema))


def _config(model_id: str, path: Path, **options: Any) -> ModelConfig:
    return ModelConfig(id=model_id, path=str(path), **options)


# Slow: four engines and two dozen answers (~5 s); the quick run keeps the sharing itself (the next test).
@pytest.mark.slow
def test_entries_on_one_checkpoint_share_its_tokenizers_and_answer_as_alone(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    configs = (
        _config("plus", QWEN25),
        _config("turbo", QWEN25, max_batch_size=2),
        _config("qwen3", QWEN3),
    )

    async def scenario() -> None:
        registry = await ModelRegistry.start(configs, settings)
        # An engine of its own (no SharedLoads), for the answers to compare with.
        alone = LocalEngine(_config("alone", QWEN25), settings=settings)
        await alone.start()
        try:
            plus, big, other = (registry.get(i).engine for i in ("plus", "turbo", "qwen3"))
            assert isinstance(plus, LocalEngine) and isinstance(big, LocalEngine)
            assert isinstance(other, LocalEngine)
            shared = plus._loaded.tokenizers
            assert big._loaded.tokenizers is shared
            assert other._loaded.tokenizers is not shared
            assert alone._loaded.tokenizers is not shared
            # The locks come with the tokenizers: every call into one tokenizer object holds its lock.
            assert plus._decode_lock is big._decode_lock is shared.decode_lock
            assert plus._renderer._lock is big._renderer._lock is shared.render_lock
            assert shared.render is not shared.decode
            # Two Rust tokenizers (each thread has its own to borrow); only the read-only data the
            # rendering copy was built from is shared (loader.copy_tokenizer).
            assert shared.render.backend_tokenizer is not shared.decode.backend_tokenizer
            assert shared.render.init_kwargs is not shared.decode.init_kwargs
            # So is the grammar compiler (its ~2 s set-up and its cache of compiled grammars); each
            # engine keeps its own mask plans (its inference thread's alone).
            grammars = plus._grammars
            assert big._grammars.compiled is grammars.compiled
            assert other._grammars.compiled is not grammars.compiled
            assert alone._grammars.compiled is not grammars.compiled
            assert big._grammars.masks is not grammars.masks
            schema = {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}},
                "required": ["ok"],
                "additionalProperties": False,
            }
            for engine in (plus, big):
                text, _ = await answer(engine, constrained_request(schema))
                assert isinstance(json.loads(text)["ok"], bool), text
            assert len(grammars.compiled) == 1  # compiled once, for the first entry, then cached

            # The same answers, one request at a time, as an engine with tokenizers of its own.
            for prompt in PROMPTS[:4]:
                mine, theirs = (
                    request(prompt, max_tokens=12, temperature=0.0),
                    request(prompt, max_tokens=12, temperature=0.0),
                )
                assert await answer(plus, mine) == await answer(alone, theirs)

            # All at once: both entries (and the other checkpoint) render, decode and tokenize
            # concurrently, on worker threads and the event loop. (Batched answers may differ from
            # lone ones in the last bits of the logits, so only their being whole is compared.)
            async def tokenize(engine: LocalEngine, text: str) -> list[tuple[int, str]]:
                return await asyncio.to_thread(engine.tokenize, text)

            runs = await asyncio.gather(
                *(
                    answer(e, request(p, max_tokens=12, temperature=0.0))
                    for p in PROMPTS
                    for e in (plus, big, other)
                ),
                *(tokenize(e, p) for p in PROMPTS for e in (plus, big)),
            )
            answers, tokens = runs[: 3 * len(PROMPTS)], runs[3 * len(PROMPTS) :]
            for text, finished in answers:
                assert text and finished.reason == "length" and finished.usage.completion_tokens == 12
            assert tokens == [alone.tokenize(p) for p in PROMPTS for _ in (plus, big)]
        finally:
            await alone.aclose()
            await registry.aclose()

    run(scenario())


def test_the_second_entry_says_whose_tokenizer_it_took(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    shared = SharedLoads()
    out = io.StringIO()
    console = Console(file=out, width=200)
    first = LocalEngine(_config("first", QWEN25), settings=settings, console=console, shared=shared)
    second = LocalEngine(_config("second", QWEN25), settings=settings, console=console, shared=shared)

    async def scenario() -> None:
        await first.start()
        await second.start()
        await first.aclose()
        await second.aclose()

    run(scenario())
    steps = [line.strip() for line in out.getvalue().splitlines() if line.startswith("  tokenizer")]
    assert len(steps) == 2, out.getvalue()
    assert steps[0].startswith("tokenizer: ")
    assert steps[1].startswith("tokenizer (shared with first): ")
