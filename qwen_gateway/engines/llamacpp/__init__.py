"""The llama.cpp engine: GGUF checkpoints run in-process by llama.cpp (llama-cpp-python's C API),
several sequences decoded together per step.

``LlamaCppEngine`` is imported lazily: importing this package does not load llama.cpp.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qwen_gateway.engines.llamacpp.engine import LlamaCppEngine

__all__ = ["LlamaCppEngine", "available"]


def available() -> bool:
    """Whether llama-cpp-python is installed (without importing it)."""
    return importlib.util.find_spec("llama_cpp") is not None


def __getattr__(name: str) -> Any:
    if name == "LlamaCppEngine":
        from qwen_gateway.engines.llamacpp.engine import LlamaCppEngine

        return LlamaCppEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
