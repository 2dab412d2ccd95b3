"""Engines by name, imported lazily so torch loads only when a local engine is configured."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, TypeVar

from qwen_gateway.errors import StartupError
from qwen_gateway.settings import EngineConfig, engine_config

if TYPE_CHECKING:
    from qwen_gateway.engines.base import Engine
    from qwen_gateway.settings import ModelConfig, Settings

T = TypeVar("T")

# name -> "module:Class". Any other "module:Class" string in a config is accepted as-is.
ENGINES: dict[str, str] = {
    "local": "qwen_gateway.engines.local:LocalEngine",
    "openai": "qwen_gateway.engines.openai:OpenAIEngine",
    "dashscope": "qwen_gateway.engines.openai:DashScopeEngine",
    "llamacpp": "qwen_gateway.engines.llamacpp:LlamaCppEngine",
}

# name -> "module:Class" of the built-in engines' option models, each in a module that imports neither
# torch nor the engine: a typo in a config is reported in a fraction of a second instead of after the
# ~8 s of CPU that importing the local engine (torch, transformers, xgrammar) costs. Each must be the
# engine class's own ``config_model`` (tests/unit/engines/test_registry.py checks it).
CONFIG_MODELS: dict[str, str] = {
    "local": "qwen_gateway.engines.local.options:LocalModelConfig",
    "openai": "qwen_gateway.engines.openai.options:OpenAIModelConfig",
    "dashscope": "qwen_gateway.engines.openai.options:DashScopeModelConfig",
    "llamacpp": "qwen_gateway.engines.llamacpp.options:LlamaCppModelConfig",
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
            if "local" in module_name or "llamacpp" in module_name
            else ""
        )
        raise StartupError(f"cannot import engine module {module_name!r}: {exc}{hint}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise StartupError(f"engine module {module_name!r} has no attribute {attr!r}") from None


def engine_class(config: ModelConfig) -> Any:
    """The class named by ``config.engine``."""
    return import_from_string(ENGINES.get(config.engine, config.engine))


def typed_config(config: ModelConfig) -> EngineConfig:
    """``config`` checked against its engine's declared options (the class attribute
    ``config_model``, an :class:`EngineConfig` subclass; an engine without one takes none)."""
    if config.engine in CONFIG_MODELS:
        model = import_from_string(CONFIG_MODELS[config.engine])
    else:
        model = getattr(engine_class(config), "config_model", EngineConfig)
    if not (isinstance(model, type) and issubclass(model, EngineConfig)):
        raise StartupError(f"engine {config.engine!r}: config_model must subclass EngineConfig")
    return engine_config(config, model)


class SharedLoads:
    """What the engines of one model registry load once for all of them, keyed by what it was loaded
    from: the local engine keeps a checkpoint's tokenizers and its grammar compiler here, so the
    [[models]] entries on one checkpoint (an id per context window or sampling default) load them once
    instead of once each.

    Made by ``ModelRegistry.start`` for its engines and dropped once they are started: nothing outlives
    the engines that hold it, and two registries (two apps in one process) never share a load."""

    def __init__(self) -> None:
        self._items: dict[Hashable, tuple[str, Any]] = {}
        self._lock = threading.Lock()

    def get_or_load(self, key: Hashable, model_id: str, load: Callable[[], T]) -> tuple[T, str]:
        """``key``'s value, made by ``load`` on its first request; with the id of the model whose
        request loaded it (``model_id`` itself when this call did). The registry starts its engines
        one after another; the lock keeps a key loaded once even if two threads asked at once."""
        with self._lock:
            found = self._items.get(key)
            if found is None:
                found = self._items[key] = (model_id, load())
            owner, value = found
            return value, owner


def create_engine(config: ModelConfig, settings: Settings, *, shared: SharedLoads | None = None) -> Engine:
    """Build (not start) the engine that serves ``config``, given its checked options. ``shared`` goes
    to engine classes that declare ``shares_loads = True`` (the local engine); others never see it."""
    cls = engine_class(config)
    extra: dict[str, Any] = {}
    if shared is not None and getattr(cls, "shares_loads", False) is True:
        extra["shared"] = shared
    engine: Engine = cls(typed_config(config), settings=settings, **extra)
    return engine
