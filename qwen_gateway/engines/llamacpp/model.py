"""A GGUF checkpoint opened with llama.cpp's C API (through llama-cpp-python's ctypes bindings): the
model, its vocabulary (tokenize / detokenize / special tokens) and one decoding context.

Only the low-level bindings are used: llama-cpp-python's high-level ``Llama`` class runs one sequence
at a time, while the engine decodes several sequences per ``llama_decode`` call (see scheduler.py).
ctypes releases the GIL during each C call, so the event loop keeps serving while a batch decodes.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp.llama_cpp as C

from qwen_gateway.engines.rules import GenerationDefaults
from qwen_gateway.errors import StartupError

# llama_token_attr bits (llama.h): tokens the tokenizer treats as markup rather than ordinary text.
_ATTR_CONTROL = 1 << 3
_ATTR_USER_DEFINED = 1 << 4
_backend_lock = threading.Lock()
_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            C.llama_log_set(_QUIET_LOG, ctypes.c_void_p(0))
            C.llama_backend_init()
            _backend_ready = True


@C.llama_log_callback  # type: ignore[untyped-decorator]
def _quiet_log(level: int, text: bytes, user_data: Any) -> None:
    """llama.cpp's own log lines (hundreds per load) are dropped; errors surface as return codes."""


_QUIET_LOG = _quiet_log


@dataclass(frozen=True, slots=True)
class ContextShape:
    kv_tokens: int  # cells of the unified KV cache, shared by every sequence
    max_sequences: int
    batch_tokens: int  # tokens one llama_decode call takes at most
    threads: int | None


class GgufModel:
    """A loaded GGUF model and its vocabulary. Tokenizing and detokenizing are thread-safe (they only
    read the vocabulary); the context (:meth:`new_context`) belongs to the inference thread."""

    def __init__(self, path: Path) -> None:
        _init_backend()
        params = C.llama_model_default_params()
        params.n_gpu_layers = 0
        model = C.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise StartupError(f"llama.cpp could not load {path} (not a GGUF model it supports?)")
        self.path = path
        self.model = model
        self.vocab = C.llama_model_get_vocab(model)
        self.n_vocab = int(C.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(C.llama_model_n_ctx_train(model))
        self._pieces: dict[int, bytes] = {}
        self.special_tokens: dict[str, int] = {}
        self.eog_ids: frozenset[int] = frozenset()
        self._scan_vocab()

    def _scan_vocab(self) -> None:
        """The special tokens (control and user-defined, e.g. ``<|im_end|>``, ``<tool_call>``) by text,
        and which of them end a generation (llama.cpp's end-of-generation set)."""
        eog = set()
        for token in range(self.n_vocab):
            attr = int(C.llama_vocab_get_attr(self.vocab, token))
            if attr & (_ATTR_CONTROL | _ATTR_USER_DEFINED):
                text = self.piece(token).decode("utf-8", errors="replace")
                if text:
                    self.special_tokens.setdefault(text, token)
                if C.llama_vocab_is_eog(self.vocab, token):
                    eog.add(token)
        for token in (C.llama_vocab_eos(self.vocab), C.llama_vocab_eot(self.vocab)):
            if token >= 0:
                eog.add(int(token))
        self.eog_ids = frozenset(eog)

    # -- metadata ------------------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        size = 1 << 16
        buf = ctypes.create_string_buffer(size)
        n = C.llama_model_meta_val_str(self.model, key.encode(), buf, size)
        if n < 0:
            return None
        if n >= size:  # a long chat template: ask again with room for all of it
            buf = ctypes.create_string_buffer(n + 1)
            C.llama_model_meta_val_str(self.model, key.encode(), buf, n + 1)
        return buf.value.decode("utf-8", errors="replace")

    def sampling_defaults(self) -> GenerationDefaults:
        def number(key: str) -> float | None:
            raw = self.meta(f"general.sampling.{key}")
            try:
                return float(raw) if raw is not None else None
            except ValueError:
                return None

        top_k = number("top_k")
        return GenerationDefaults(
            temperature=number("temp"),
            top_p=number("top_p"),
            top_k=int(top_k) if top_k is not None else None,
            repetition_penalty=number("penalty_repeat"),
        )

    @property
    def chat_template(self) -> str | None:
        return self.meta("tokenizer.chat_template")

    def token_text(self, token: int) -> str:
        return self.piece(token).decode("utf-8", errors="replace") if token >= 0 else ""

    @property
    def bos_id(self) -> int:
        return int(C.llama_vocab_bos(self.vocab))

    @property
    def eos_id(self) -> int:
        return int(C.llama_vocab_eos(self.vocab))

    # -- text <-> ids ----------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """``text`` as the model reads it: special-token text (``<|im_start|>``) becomes its token, and
        nothing is added (the chat template already wrote any BOS), as transformers'
        ``tokenizer(text, add_special_tokens=False)`` does."""
        data = text.encode("utf-8")
        room = len(data) + 8
        tokens = (C.llama_token * room)()
        n = C.llama_tokenize(self.vocab, data, len(data), tokens, room, False, True)
        if n < 0:
            room = -n
            tokens = (C.llama_token * room)()
            n = C.llama_tokenize(self.vocab, data, len(data), tokens, room, False, True)
        return list(tokens[:n])

    def piece(self, token: int) -> bytes:
        """The token's own bytes (special tokens as their text), cached per id."""
        hit = self._pieces.get(token)
        if hit is not None:
            return hit
        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self.vocab, token, buf, 64, 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.vocab, token, buf, -n, 0, True)
        out = buf.raw[:n]
        self._pieces[token] = out
        return out

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        """The ids' text; bytes of an incomplete UTF-8 character show as U+FFFD (the incremental
        detokenizer waits for the rest)."""
        eog = self.eog_ids if skip_special_tokens else frozenset()
        return b"".join(self.piece(t) for t in token_ids if t not in eog).decode("utf-8", errors="replace")

    # -- the decoding context -------------------------------------------------------------------------

    def new_context(self, shape: ContextShape) -> Any:
        params = C.llama_context_default_params()
        params.n_ctx = shape.kv_tokens
        params.n_batch = shape.batch_tokens
        params.n_ubatch = shape.batch_tokens
        params.n_seq_max = shape.max_sequences
        # One pool of cells for all sequences (not n_ctx / n_seq_max each): a long answer may use what
        # short ones leave free; the scheduler admits requests by what they may still take.
        params.kv_unified = True
        params.no_perf = True
        if shape.threads is not None:
            params.n_threads = shape.threads
            params.n_threads_batch = shape.threads
        ctx = C.llama_init_from_model(self.model, params)
        if not ctx:
            raise StartupError(f"llama.cpp could not create a context for {self.path.name}")
        return ctx

    def close(self) -> None:
        if self.model:
            C.llama_model_free(self.model)
            self.model = None
