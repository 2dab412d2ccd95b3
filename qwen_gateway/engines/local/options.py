"""The ``local`` engine's options in a ``[[models]]`` entry (torch-free, so a config is checked before
any model loads)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qwen_gateway.settings import EngineConfig


class LocalModelConfig(EngineConfig):
    # A checkpoint directory, a .gguf file, or a Hugging Face repo id ("Qwen/Qwen2.5-0.5B-Instruct").
    path: str | None = None
    gguf_file: str | None = None  # file name inside ``path`` when it is a directory or repo of GGUFs
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    max_batch_size: int = Field(default=8, ge=1, le=256)
    # How the local engine shares the model between concurrent requests. "batched" decodes them in one
    # forward pass (measured 2.5x the throughput of "interleaved" at 4 streams on a 2-core CPU).
    scheduler: Literal["batched", "interleaved"] = "batched"
    # Prompt tokens prefilled per scheduler step while other requests are decoding.
    prefill_chunk: int = Field(default=512, ge=16)
    # On the CPU in float32: the output layer's and the large linear layers' products through oneDNN on
    # weights packed once at load (engines/local/cpu_matmul.py). False keeps torch's own nn.Linear,
    # which saves the second copy of an output layer tied to the embeddings (+545 MB on Qwen2.5-0.5B).
    packed_linear: bool = True
