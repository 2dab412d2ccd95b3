"""A copy of a transformers tokenizer that another thread can use at the same time.

The engine keeps two tokenizers per checkpoint (decoding on the event loop, prompt rendering on worker
threads: loader.Tokenizers), and the grammar compiler takes a third. ``copy.deepcopy`` does it, but it
round-trips the Rust tokenizer through its JSON (~0.8 s for Qwen's 151k-entry vocabulary: serialising,
then parsing 4.5 MB again). A BPE tokenizer loaded by transformers still holds the vocabulary and merges
it was built from (``_vocab``, ``_merges``), so the copy's Rust tokenizer is built from those instead,
as transformers' own constructor built the original (~0.25 s), and checked against it; anything that
does not pass the checks falls back to the deep copy.
"""

from __future__ import annotations

import copy
from typing import Any

# Attributes a transformers tokenizer keeps from its construction and never changes afterwards (its
# __init__ builds the Rust tokenizer from them; at most saving reads them): the vocabulary and merges,
# 151k entries each for Qwen's. Shared by the copy, not copied.
_CONSTRUCTION_DATA = ("_vocab", "_merges")

# Encoded by both tokenizers before the rebuilt one is used: byte-level merges over several scripts,
# digits, whitespace runs and a special token, so a wrong merge list or added-token table shows.
_PROBE = (
    "Hello, world! The quick brown fox jumps over 13 lazy dogs.\n\n  def f(x):\n\treturn x**2  # ok\n"
    "Привет, мир. 你好，世界！こんにちは。 مرحبا 🙂 café naïve <|endoftext|> <|im_start|>user"
)


def copy_tokenizer(tokenizer: Any) -> Any:
    """A deep copy of ``tokenizer`` with its own Rust tokenizer and its own settings, sharing only the
    read-only construction data above."""
    shared = (getattr(tokenizer, name, None) for name in _CONSTRUCTION_DATA)
    memo: dict[int, Any] = {id(value): value for value in shared if value is not None}
    backend = getattr(tokenizer, "_tokenizer", None)
    rebuilt = _rebuilt_backend(tokenizer, backend)
    if rebuilt is not None:
        memo[id(backend)] = rebuilt
    return copy.deepcopy(tokenizer, memo)


def _rebuilt_backend(tokenizer: Any, backend: Any) -> Any:
    """A new Rust tokenizer equal to ``backend``, built from the tokenizer's vocabulary and merges;
    None when it is not a BPE tokenizer built from them (a GGUF load, for one, hands transformers a
    finished backend and leaves a placeholder vocabulary) or the result differs in anything checked."""
    try:
        from tokenizers import Tokenizer
        from tokenizers.models import BPE
    except ImportError:  # pragma: no cover - transformers' fast tokenizers always bring it
        return None
    vocab = getattr(tokenizer, "_vocab", None)
    merges = getattr(tokenizer, "_merges", None)
    if not isinstance(backend, Tokenizer) or not isinstance(model := backend.model, BPE):
        return None
    if not isinstance(vocab, dict) or not isinstance(merges, list) or not merges:
        return None
    if len(vocab) != backend.get_vocab_size(with_added_tokens=False):
        return None
    new = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=model.dropout,
            unk_token=model.unk_token,
            continuing_subword_prefix=model.continuing_subword_prefix,
            end_of_word_suffix=model.end_of_word_suffix,
            fuse_unk=model.fuse_unk,
            byte_fallback=model.byte_fallback,
            ignore_merges=model.ignore_merges,
        )
    )
    # The pipeline's other parts are small: copies of their own (through their JSON), so the two
    # tokenizers share no Rust object.
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        value = getattr(backend, part)
        if value is not None:
            setattr(new, part, copy.deepcopy(value))
    added = backend.get_added_tokens_decoder()
    for token_id in sorted(added):
        token = added[token_id]
        (new.add_special_tokens if token.special else new.add_tokens)([token])
    if backend.padding is not None:
        new.enable_padding(**backend.padding)
    if backend.truncation is not None:
        new.enable_truncation(**backend.truncation)
    new.encode_special_tokens = backend.encode_special_tokens
    same = (
        new.get_vocab_size(with_added_tokens=True) == backend.get_vocab_size(with_added_tokens=True)
        and {i: repr(t) for i, t in new.get_added_tokens_decoder().items()}
        == {i: repr(t) for i, t in added.items()}
        and new.encode(_PROBE).ids == backend.encode(_PROBE).ids
    )
    return new if same else None
