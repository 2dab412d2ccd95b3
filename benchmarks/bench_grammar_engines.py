"""Grammar engines compared on this machine: xgrammar, llguidance, outlines-core.

For the real Qwen tokenizer (151k vocabulary, from a tiny checkpoint in ../shared/models) and a few JSON
schemas, prints per engine:
- tokenizer setup (once per model),
- compile time per schema (cold: a fresh compiler/cache each time),
- per-token cost of the constraint at batch 1 and 4: fill the rows' bitmask + apply it to [rows, vocab]
  logits + advance each matcher by the sampled token, in wall time and in process CPU time (the machine
  is shared; CPU time counts every thread the engine uses).

Usage: PYTHONPATH=. python benchmarks/bench_grammar_engines.py [--tokens 200] [--only xgrammar,...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "tiny-qwen2.5"

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 1000},
                    "email": {"type": "string", "minLength": 3, "maxLength": 30},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
                },
                "required": ["id", "email", "tags"],
            },
            "status": {"enum": ["active", "inactive", "banned"]},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["user", "status", "score"],
    },
    "wide": {
        "type": "object",
        "properties": {f"field_{i}": {"type": ["string", "integer", "boolean"]} for i in range(30)},
        "required": [f"field_{i}" for i in range(0, 30, 3)],
    },
}


class Runner:
    """One engine: setup, compile, and a batch of matchers to drive."""

    name = ""

    def setup(self, tokenizer: Any, vocab: int) -> None: ...
    def compile(self, schema: dict[str, Any]) -> Any: ...
    def matchers(self, compiled: Any, n: int) -> list[Any]: ...
    def fill(self, ms: list[Any], bitmask: Any, logits: torch.Tensor) -> None: ...
    def advance(self, m: Any, token: int) -> bool:  # True: the grammar ended
        ...


class XGrammar(Runner):
    name = "xgrammar"

    def setup(self, tokenizer: Any, vocab: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.vocab = vocab

    def compile(self, schema: dict[str, Any]) -> Any:
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matchers(self, compiled: Any, n: int) -> list[Any]:
        self.bitmask = self.xgr.allocate_token_bitmask(n, self.vocab)
        return [self.xgr.GrammarMatcher(compiled) for _ in range(n)]

    def fill(self, ms: list[Any], bitmask: Any, logits: torch.Tensor) -> None:
        for i, m in enumerate(ms):
            m.fill_next_token_bitmask(self.bitmask, i)
        self.xgr.apply_token_bitmask_inplace(logits, self.bitmask)

    def advance(self, m: Any, token: int) -> bool:
        assert m.accept_token(token)
        return bool(m.is_terminated())


class LLGuidance(Runner):
    name = "llguidance"

    def setup(self, tokenizer: Any, vocab: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.vocab = vocab
        self.executor = llguidance.LLExecutor()

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False}
        )
        # llguidance compiles lazily: the matcher builds its lexer/parser, the first mask does the rest.
        m = self.llg.LLMatcher(self.tok, grammar)
        bm = self.llg.torch.allocate_token_bitmask(1, self.vocab)
        self.llg.torch.fill_next_token_bitmask(m, bm, 0)
        return grammar

    def matchers(self, compiled: Any, n: int) -> list[Any]:
        self.bitmask = self.llg.torch.allocate_token_bitmask(n, self.vocab)
        return [self.llg.LLMatcher(self.tok, compiled) for _ in range(n)]

    def fill(self, ms: list[Any], bitmask: Any, logits: torch.Tensor) -> None:
        if len(ms) == 1:
            self.llg.torch.fill_next_token_bitmask(ms[0], self.bitmask, 0)
        else:
            self.llg.torch.fill_next_token_bitmask_par(
                self.executor, [(m, i) for i, m in enumerate(ms)], self.bitmask
            )
        self.llg.torch.apply_token_bitmask_inplace(logits, self.bitmask)

    def advance(self, m: Any, token: int) -> bool:
        assert m.consume_token(token), m.get_error()
        return bool(m.is_stopped())


class OutlinesCore(Runner):
    name = "outlines-core"

    def setup(self, tokenizer: Any, vocab: int) -> None:
        from outlines_core import Vocabulary

        self.vocab = vocab
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        byte_decoder = _byte_decoder()
        mapping: dict[bytes, list[int]] = {}
        for token, idx in tokenizer.get_vocab().items():
            if idx == eos or idx >= 151643:  # specials are never grammar text
                continue
            raw = bytes(byte_decoder[c] for c in token if c in byte_decoder)
            if len(raw) != len(token):
                continue
            mapping.setdefault(raw, []).append(idx)
        self.eos = eos
        self.voc = Vocabulary(eos, mapping)

    def compile(self, schema: dict[str, Any]) -> Any:
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema

        return Index(build_regex_from_schema(json.dumps(schema)), self.voc)

    def matchers(self, compiled: Any, n: int) -> list[Any]:
        from outlines_core import Guide

        words = (self.vocab + 31) // 32
        self.bitmask = torch.zeros(n, words, dtype=torch.int32)
        return [Guide(compiled) for _ in range(n)]

    def fill(self, ms: list[Any], bitmask: Any, logits: torch.Tensor) -> None:
        words = self.bitmask.shape[1]
        for i, m in enumerate(ms):
            row = self.bitmask[i]
            m.write_mask_into(row.data_ptr(), words, 4)
        import xgrammar as xgr  # same bitmask layout: reuse its CPU apply kernel

        xgr.apply_token_bitmask_inplace(logits, self.bitmask)

    def advance(self, m: Any, token: int) -> bool:
        if token == self.eos:
            return True
        m.advance(token)
        return bool(m.is_finished())


def _byte_decoder() -> dict[str, int]:
    # GPT-2 byte-level BPE's printable stand-ins for bytes.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def run(runner: Runner, tokenizer: Any, vocab: int, tokens: int) -> None:
    t0 = time.perf_counter()
    runner.setup(tokenizer, vocab)
    print(f"{runner.name}: tokenizer setup {1000 * (time.perf_counter() - t0):.0f} ms")
    gen = torch.Generator().manual_seed(0)
    for sname, schema in SCHEMAS.items():
        walls, cpus = [], []
        compiled = None
        for _ in range(3):
            w, c = time.perf_counter(), time.process_time()
            compiled = runner.compile(schema)
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
        line = f"  {sname:7s} compile {1000 * min(walls):8.1f} ms wall {1000 * min(cpus):8.1f} ms cpu"
        for batch in (1, 4):
            per_w, per_c = _drive(runner, compiled, batch, vocab, tokens, gen)
            line += f" | b{batch}: {1000 * per_w:6.3f} ms/step wall {1000 * per_c:6.3f} cpu"
        print(line, flush=True)


def _drive(
    runner: Runner, compiled: Any, batch: int, vocab: int, tokens: int, gen: torch.Generator
) -> tuple[float, float]:
    """Per-step cost of the constraint for ``batch`` rows; matchers that end restart."""
    ms = runner.matchers(compiled, batch)  # also sizes the runner's bitmask for ``batch`` rows
    wall = cpu = 0.0
    steps = 0
    bitmask = runner.bitmask
    for _ in range(tokens):
        logits = torch.randn(batch, vocab, generator=gen)
        w, c = time.perf_counter(), time.process_time()
        runner.fill(ms, None, logits)
        picks = torch.argmax(logits, dim=-1).tolist()
        for i, t in enumerate(picks):
            if runner.advance(ms[i], int(t)):
                ms[i] = runner.matchers(compiled, 1)[0]
                runner.bitmask = bitmask
        wall += time.perf_counter() - w
        cpu += time.process_time() - c
        steps += 1
    return wall / steps, cpu / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--only", default="xgrammar,llguidance,outlines-core")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    vocab = json.loads((MODEL / "config.json").read_text())["vocab_size"]
    print(
        f"tokenizer {MODEL.name}: {len(tokenizer)} tokens, model vocab {vocab}; torch threads {torch.get_num_threads()}"
    )
    print("(machine shared by several engineers: wall figures are noisy, CPU time less so)")
    runners = {r.name: r for r in (XGrammar(), LLGuidance(), OutlinesCore())}
    base = []
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 4):
        logits = torch.randn(batch, vocab, generator=gen)
        w = time.perf_counter()
        for _ in range(50):
            torch.argmax(logits, dim=-1).tolist()
        base.append(f"b{batch} {1000 * (time.perf_counter() - w) / 50:.3f} ms")
    print("baseline argmax per step (no constraint):", ", ".join(base))
    for name in args.only.split(","):
        try:
            run(runners[name], tokenizer, vocab, args.tokens)
        except Exception as exc:  # report and go on to the next engine
            print(f"{name}: failed: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
