"""Engines by name, imported lazily so torch loads only when a local engine is configured."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qwen_gateway.errors import StartupError

if TYPE_CHECKING:
    from qwen_gateway.engines.base import Engine
    from qwen_gateway.settings import ModelConfig, Settings

# name -> "module:Class". Any other "module:Class" string in a config is accepted as-is.
ENGINES: dict[str, str] = {
    "local": "qwen_gateway.engines.local:LocalEngine",
}


def import_from_string(target: str) -> Any:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise StartupError(f"engine {target!r} is not a known engine name or a 'module:Class' string")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = (
            " (install the 'local' extra: pip install 'qwen-gateway[local]')"
            if "local" in module_name
            else ""
        )
        raise StartupError(f"cannot import engine module {module_name!r}: {exc}{hint}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise StartupError(f"engine module {module_name!r} has no attribute {attr!r}") from None


def create_engine(config: ModelConfig, settings: Settings) -> Engine:
    """Build (not start) the engine that serves ``config``."""
    cls = import_from_string(ENGINES.get(config.engine, config.engine))
    engine: Engine = cls(config, settings=settings)
    return engine
