"""The ``llamacpp`` engine's options in a ``[[models]]`` entry (checked before any model loads)."""

from __future__ import annotations

from pydantic import Field

from qwen_gateway.settings import EngineConfig


class LlamaCppModelConfig(EngineConfig):
    # A .gguf file, a directory holding one (or several: pick with gguf_file), or a Hugging Face repo
    # id with gguf_file ("Qwen/Qwen2.5-0.5B-Instruct-GGUF").
    path: str | None = None
    gguf_file: str | None = None
    revision: str | None = None
    # Sequences decoded together in one llama_decode call (each has its own seq id in the KV cache).
    max_batch_size: int = Field(default=4, ge=1, le=64)
    # KV-cache cells shared by all running sequences (llama.cpp's unified cache). A request is started
    # only when its prompt plus its token cap fit beside the running ones; None: max_batch_size times
    # the context, at most 16384 (the cache is allocated up front, so this bounds the RSS).
    kv_cache_tokens: int | None = Field(default=None, ge=64)
    # Tokens one llama_decode call takes at most (prompt chunks of new requests beside the decode rows).
    prefill_chunk: int = Field(default=512, ge=16)
    # Keep a finished request's KV cells and reuse their longest common prefix with a later prompt
    # (repeated system prompts, earlier turns of a conversation): only the rest is prefilled.
    prefix_cache: bool = True
    # CPU threads for llama.cpp (None: half the CPUs this process may use, at least one).
    threads: int | None = Field(default=None, ge=1)
