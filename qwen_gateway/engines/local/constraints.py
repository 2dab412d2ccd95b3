"""Output constraints for the local engine: a JSON schema or a named tool call compiled by xgrammar.

Why xgrammar (measured on this shared 2-core CPU with the 151k-token Qwen tokenizer, one torch thread;
``benchmarks/bench_grammar_engines.py``): computing a row's token mask costs 0.03-0.04 ms against
llguidance's 0.23-0.26 ms, which matters once the mask is applied from a cache (:class:`MaskPlans`);
its tokenizer setup takes ~2 s against llguidance's 12-16 s; a schema compiles in 25-37 ms of CPU
(llguidance compiles lazily, ~1-2 ms, then pays on its first masks); outlines-core took 1.7-6.6 s of
CPU to compile one schema, which rules it out for schemas that arrive per request. xgrammar also
composes grammars (the tool-call wrapper around a parameters schema) and ships a CPU bitmask kernel.

The pieces:
- :class:`Grammars` (one per engine) compiles an :data:`OutputConstraint` into an xgrammar
  ``CompiledGrammar``, off the event loop (the engine calls it through ``asyncio.to_thread``) and off
  the inference thread, through :class:`CompiledGrammars` (one per checkpoint: the tokenizer's
  compiler, and the compiled grammars in an LRU bounded by count and bytes).
- :class:`GrammarState` (one per sequence) is the matcher the inference thread drives: each step it
  fills its row of the batch's packed bitmask, the sampler applies the bitmask to the constrained
  rows' logits, and the sampled token advances the matcher. The end-of-answer ids are the grammar's
  stop tokens, so EOS is allowed only once the grammar is complete.

Only JSON keywords xgrammar really enforces are accepted (:func:`check_schema`): it silently ignores
others (``not``, ``uniqueItems``, ``multipleOf``, lookahead in ``pattern`` ...), and a constraint that
is accepted must guarantee that the output validates.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import json
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from qwen_gateway.engines.base import (
    JsonConstraint,
    OutputConstraint,
    ToolCallConstraint,
    ToolSpec,
)
from qwen_gateway.engines.local.tokenizer_copy import copy_tokenizer
from qwen_gateway.errors import InvalidParameter

if TYPE_CHECKING:
    from qwen_gateway.engines.local.sampling import PackedMask
    from qwen_gateway.engines.local.sequence import Sequence as SequenceState

log = logging.getLogger(__name__)

# The grammar engine is part of the ``local`` extra; without it the engine advertises no kinds. It is
# imported on the first constrained request (``_xgr``), not with the engine: 0.2 s of every local
# engine's start-up (measured after torch and transformers), which most servers never use.
_AVAILABLE = importlib.util.find_spec("xgrammar") is not None

# The kinds (CONSTRAINT_KINDS names) this module compiles.
KINDS = frozenset({"json", "tool_call"}) if _AVAILABLE else frozenset()


@functools.cache
def _xgr() -> Any:
    import xgrammar

    return xgrammar


# JSON text the model writes: the separators Python's json.dumps and the Qwen chat templates' tojson
# use, and no free whitespace (random or confused weights would otherwise pad an answer forever).
SEPARATORS = (", ", ": ")
# Hermes-style tool call, exactly as the Qwen2.5/Qwen3 chat templates render an assistant's call.
TOOL_CALL_OPEN = "<tool_call>\n"
TOOL_CALL_CLOSE = "\n</tool_call>"
# Tokens the tool-call grammar prefers whenever they are allowed: the tags as the single special
# tokens the model was trained on, not spelled out as "<", "tool", "_call", ">".
TOOL_TAGS = ("<tool_call>", "</tool_call>")

# Bounds on what a request may make us compile and keep.
MAX_SCHEMA_BYTES = 64 * 1024
CACHE_ENTRIES = 256
CACHE_BYTES = 64 * 1024 * 1024

# Keywords that only annotate a schema (no effect on which values are valid).
_ANNOTATIONS = frozenset(
    {"title", "description", "$schema", "$id", "$comment", "examples", "default", "deprecated",
     "readOnly", "writeOnly", "strict"}
)  # fmt: skip
# Keywords xgrammar's JSON-schema converter enforces.
_ENFORCED = frozenset(
    {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
     "maxItems", "enum", "const", "anyOf", "$ref", "$defs", "definitions", "minLength", "maxLength",
     "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
)  # fmt: skip
# xgrammar's regex accepts these and does not enforce them.
_LOOKAROUND = re.compile(r"\(\?|\\[1-9]")
_FORMATS = frozenset({"date", "time", "date-time", "email", "uuid", "ipv4", "ipv6"})
# Keywords whose value is a map of name -> subschema, or a list of subschemas.
_SCHEMA_MAPS = frozenset({"properties", "$defs", "definitions"})
_SCHEMA_LISTS = frozenset({"anyOf", "prefixItems", "allOf"})


def check_schema(schema: Any, param: str) -> None:
    """Refuse (400 naming ``param``) a schema with a keyword the grammar would not enforce."""
    stack: list[tuple[Any, str]] = [(schema, "")]
    while stack:
        node, where = stack.pop()
        if isinstance(node, bool):
            continue
        if not isinstance(node, dict):
            raise InvalidParameter(
                f"{param}: the JSON schema at '{where or '/'}' is not an object.", param=param
            )
        for key, value in node.items():
            if key in _ANNOTATIONS:
                continue
            if key == "allOf" and isinstance(value, list) and len(value) == 1:
                pass  # a single-branch allOf is the branch itself (pydantic writes these)
            elif key not in _ENFORCED:
                raise InvalidParameter(
                    f"{param}: the JSON schema keyword '{key}' is not supported for constrained output.",
                    param=param,
                )
            if key == "format" and value not in _FORMATS:
                raise InvalidParameter(
                    f"{param}: the JSON schema format '{value}' is not supported.", param=param
                )
            if key == "pattern" and isinstance(value, str) and _LOOKAROUND.search(value):
                raise InvalidParameter(
                    f"{param}: lookaround and backreferences in 'pattern' are not supported.", param=param
                )
            if key in _SCHEMA_MAPS and isinstance(value, dict):
                stack.extend((v, f"{where}/{key}/{k}") for k, v in value.items())
            elif key in _SCHEMA_LISTS and isinstance(value, list):
                stack.extend((v, f"{where}/{key}/{i}") for i, v in enumerate(value))
            elif key in ("items", "additionalProperties") and isinstance(value, dict | bool):
                stack.append((value, f"{where}/{key}"))


# xgrammar's C++ log prefix on its error messages: a time, then the source file and line.
_LOG_PREFIX = re.compile(r"^(?:\[[\d:]+\]\s*)?(?:[^\s:]+\.(?:cc|h|cpp):\d+:\s*)?")


class CompiledGrammars:
    """A tokenizer's grammar compiler and the grammars it compiled: thread-safe, LRU-bounded by count
    and bytes. What it compiles depends only on the tokenizer, the vocabulary size and the stop ids, so
    the engines of every [[models]] entry on one checkpoint share one (through the registry's
    ``SharedLoads``, as they share the tokenizer): the ~2 s set-up is paid once per checkpoint, and a
    schema compiled for one entry is cached for all."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]) -> None:
        if not _AVAILABLE:
            raise RuntimeError("xgrammar is not installed")
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = sorted(stop_ids)
        self._info: Any = None
        self._compiler: Any = None
        self._setup_lock = threading.Lock()
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._bytes = 0

    def _ensure(self) -> Any:
        # The tokenizer's grammar view takes ~2 s to build: only a server that gets a constrained
        # request pays it, once per checkpoint.
        with self._setup_lock:
            if self._compiler is None:
                # A copy of its own: the setup walks the vocabulary on a worker thread while the
                # engine's tokenizer keeps decoding answers.
                self._info = _xgr().TokenizerInfo.from_huggingface(
                    copy_tokenizer(self._tokenizer), vocab_size=self.vocab_size, stop_token_ids=self.stop_ids
                )
                # xgrammar's own cache off: ours below is bounded by count and bytes and keyed by request.
                self._compiler = _xgr().GrammarCompiler(self._info, max_threads=2, cache_enabled=False)
            return self._compiler

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    def get(self, key: str, build: Callable[[], Any], param: str) -> Any:
        """The compiled grammar for ``key`` (``build()`` gives its xgrammar grammar), cached."""
        compiled = self._lookup(key)
        if compiled is None:
            compiler = self._ensure()
            try:
                compiled = compiler.compile_grammar(build())
            except InvalidParameter:
                raise
            except Exception as exc:  # the schema is the request's: xgrammar's refusal is a 400
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                # Without xgrammar's log prefix ("[21:56:16] /project/cpp/regex_converter.cc:94: "):
                # the client gets the reason, not the library's build paths.
                detail = _LOG_PREFIX.sub("", first)
                raise InvalidParameter(
                    f"{param}: the JSON schema cannot be compiled: {detail}", param=param
                ) from None
            self._store(key, compiled)
        return compiled

    def _lookup(self, key: str) -> Any:
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
            return compiled

    def _store(self, key: str, compiled: Any) -> None:
        size = int(compiled.memory_size_bytes)
        with self._lock:
            if key in self._cache or size > CACHE_BYTES:
                return
            self._cache[key] = compiled
            self._bytes += size
            while len(self._cache) > CACHE_ENTRIES or self._bytes > CACHE_BYTES:
                _, old = self._cache.popitem(last=False)
                self._bytes -= int(old.memory_size_bytes)

    def __len__(self) -> int:
        return len(self._cache)


class Grammars:
    """One engine's constraints: plans a request's constraint, compiles it through the checkpoint's
    :class:`CompiledGrammars` (shared with the other engines on it, or its own), and gives each
    sequence a matcher over this engine's :class:`MaskPlans` (used by its inference thread only)."""

    def __init__(self, tokenizer: Any, compiled: CompiledGrammars) -> None:
        self.compiled = compiled
        self.vocab_size = compiled.vocab_size
        self.stop_ids = compiled.stop_ids
        self.masks = MaskPlans(compiled.vocab_size)
        self._tag_ids = [
            i for i in (tokenizer.convert_tokens_to_ids(t) for t in TOOL_TAGS)
            if isinstance(i, int) and i != tokenizer.unk_token_id
        ]  # fmt: skip

    @property
    def cached_bytes(self) -> int:
        return self.compiled.cached_bytes

    def compile(self, constraint: OutputConstraint, tools: Sequence[ToolSpec]) -> GrammarState:
        """A fresh matcher for ``constraint`` (blocking; call it off the event loop)."""
        param = "tool_choice" if isinstance(constraint, ToolCallConstraint) else "response_format"
        key, build = self._plan(constraint, tools, param)
        compiled = self.compiled.get(key, build, param)
        prefer = self._tag_ids if isinstance(constraint, ToolCallConstraint) else []
        matcher = _xgr().GrammarMatcher(compiled, override_stop_tokens=self.stop_ids)
        return GrammarState(matcher, self.masks, prefer)

    def _plan(self, constraint: OutputConstraint, tools: Sequence[ToolSpec], param: str) -> tuple[str, Any]:
        if isinstance(constraint, JsonConstraint):
            schema: Mapping[str, Any] = (
                constraint.schema if constraint.schema is not None else {"type": "object"}
            )
            text = _schema_text(schema, param)
            return "json:" + text, lambda: _json_grammar(text)
        if isinstance(constraint, ToolCallConstraint):
            tool = next((t for t in tools if t.name == constraint.name), None)
            if tool is None:
                raise InvalidParameter(
                    f"tool_choice names a function that is not in tools: {constraint.name}", param=param
                )
            parameters = dict(tool.parameters) or {"type": "object", "properties": {}}
            wrapper = {
                "type": "object",
                "properties": {"name": {"const": tool.name}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            check_schema(parameters, param)
            text = _schema_text(wrapper, param)
            return "tool:" + text, lambda: _xgr().Grammar.concat(
                _literal(TOOL_CALL_OPEN), _json_grammar(text), _literal(TOOL_CALL_CLOSE)
            )
        raise InvalidParameter("This model does not support this output constraint.", param=param)

    def __len__(self) -> int:
        return len(self.compiled)


def _schema_text(schema: Mapping[str, Any], param: str) -> str:
    check_schema(schema, param)
    text = json.dumps(schema, sort_keys=False, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise InvalidParameter(
            f"{param}: the JSON schema is longer than {MAX_SCHEMA_BYTES} bytes.", param=param
        )
    return text


# xgrammar 0.2.9 writes a string with minLength/maxLength as repetitions of this character class, which
# lets raw control characters (a tab, U+0000...) into the string: invalid JSON that json.loads refuses.
# Its unbounded strings exclude them; the bounded class is narrowed the same way.
_BOUNDED_CHAR = r"[^\"\\\r\n]"
_JSON_CHAR = r"[^\0-\x1f\"\\\r\n]"


def _json_grammar(schema_text: str) -> Any:
    grammar = _xgr().Grammar.from_json_schema(
        schema_text, any_whitespace=False, separators=SEPARATORS, strict_mode=True
    )
    ebnf = str(grammar)
    if _BOUNDED_CHAR not in ebnf:
        return grammar
    return _xgr().Grammar.from_ebnf(ebnf.replace(_BOUNDED_CHAR, _JSON_CHAR))


def _literal(text: str) -> Any:
    return _xgr().Grammar.from_ebnf("root ::= " + json.dumps(text))


class GrammarState:
    """One sequence's matcher, driven by the inference thread only."""

    __slots__ = ("failed", "masks", "matcher", "prefer")

    def __init__(self, matcher: Any, masks: MaskPlans, prefer: Sequence[int] = ()) -> None:
        self.matcher = matcher
        self.masks = masks  # the engine's, shared by its sequences
        self.prefer = list(prefer)
        self.failed = False

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)
        for token in self.prefer:
            word, bit = divmod(token, 32)
            if int(bitmask[row, word]) >> bit & 1:
                bitmask[row].zero_()
                bitmask[row, word] = _bit(bit)
                return

    def accept(self, token: int) -> bool:
        """Advance by the sampled token; False if the grammar refuses it (a bug upstream)."""
        if self.matcher.is_terminated():
            return True  # the stop token that ended the grammar was already accepted
        ok = bool(self.matcher.accept_token(token))
        self.failed = not ok
        return ok


def _bit(bit: int) -> int:
    """The int32 word with only ``bit`` set (bit 31 is the sign bit)."""
    return (1 << bit) - (1 << 32) if bit == 31 else 1 << bit


def grammar_bitmask(seqs: Sequence[SequenceState], vocab: int) -> PackedMask | None:
    """The step's packed mask for the rows with a grammar (None when no row has one: unconstrained
    batches pay one attribute check per row)."""
    rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
    if not rows:
        return None
    bitmask = _xgr().allocate_token_bitmask(len(seqs), vocab)
    states: list[GrammarState] = []
    for i in rows:
        grammar = seqs[i].grammar
        assert grammar is not None
        grammar.fill(bitmask, i)
        states.append(grammar)

    def apply(logits: torch.Tensor, rows: list[int]) -> None:
        kernel: list[int] = []
        for row, state in zip(rows, states, strict=True):
            if not state.masks.apply(logits, bitmask, row):
                kernel.append(row)
        if kernel:
            _xgr().apply_token_bitmask_inplace(logits, bitmask, indices=kernel)

    return apply, rows


_SHIFTS = torch.arange(32, dtype=torch.int32)


class MaskPlans:
    """How to apply a bitmask row seen before, without a masking pass over the whole vocabulary.

    Masking a 151k-token row costs ~0.5-0.8 ms on this CPU whatever the method (xgrammar's kernel or a
    torch ``masked_fill_``), more than a tiny model's whole decode step. But a JSON grammar visits few
    distinct masks (measured: 50 in 1000 steps of an array-of-strings schema, a 95 % hit rate), so a
    row seen before is applied from a cached id list instead: the allowed ids when they are the
    smaller side (keep them, clear the row) or the banned ones (set them to -inf), 0.14-0.22 ms per
    row against the kernel's 0.63-0.84 (measured on this machine with one torch thread, replaying
    a grammar walk). Rows whose smaller side is still huge go to the kernel. Keyed by the row's exact
    bytes, LRU-bounded; used by the inference thread only.
    """

    # At most ENTRIES plans of MAX_IDS int64 ids (+ a 19 KB key) each: under 36 MB per engine.
    ENTRIES = 64
    MAX_IDS = 1 << 16  # the smaller side of any 151k-token mask fits; longer lists save nothing

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self._plans: collections.OrderedDict[bytes, tuple[bool, torch.Tensor] | None] = (
            collections.OrderedDict()
        )

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor, row: int) -> bool:
        """Mask ``logits[row]`` from a cached plan; False: the caller uses the kernel for this row."""
        words = bitmask[row]
        key = words.numpy().tobytes()
        if key in self._plans:
            self._plans.move_to_end(key)
            plan = self._plans[key]
        else:
            plan = self._plan(words)
            self._plans[key] = plan
            if len(self._plans) > self.ENTRIES:
                self._plans.popitem(last=False)
        if plan is None:
            return False
        keep, ids = plan
        target = logits[row]
        if keep:
            values = target.index_select(0, ids)
            target.fill_(float("-inf"))
            target.index_copy_(0, ids, values)
        else:
            target.index_fill_(0, ids, float("-inf"))
        return True

    def _plan(self, words: torch.Tensor) -> tuple[bool, torch.Tensor] | None:
        bits = ((words.unsqueeze(-1) >> _SHIFTS) & 1).view(-1)[: self.vocab].bool()
        allowed = int(bits.sum())
        if min(allowed, self.vocab - allowed) > self.MAX_IDS:
            return None
        if allowed <= self.vocab - allowed:
            return True, bits.nonzero().squeeze(1)
        return False, (~bits).nonzero().squeeze(1)
