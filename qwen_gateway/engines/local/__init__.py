"""The in-process engine: Hugging Face checkpoints (directories, GGUF files, hub repo ids) run with
transformers on PyTorch, driven by our own decode loop on one inference thread per engine.

``LocalEngine`` is imported lazily so that ``qwen_gateway.engines.local.embedded`` (used before any
engine exists) does not pull in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qwen_gateway.engines.local.embedded import EMBEDDED_MODEL_ID, ensure_embedded_model

if TYPE_CHECKING:
    from qwen_gateway.engines.local.engine import LocalEngine

__all__ = ["EMBEDDED_MODEL_ID", "LocalEngine", "ensure_embedded_model"]


def __getattr__(name: str) -> Any:
    if name == "LocalEngine":
        from qwen_gateway.engines.local.engine import LocalEngine

        return LocalEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
