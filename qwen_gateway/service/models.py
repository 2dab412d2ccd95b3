"""The served models: each configured id with its engine and its effective catalog spec."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from qwen_gateway.engines.base import Engine, EngineHealth, EngineState
from qwen_gateway.engines.registry import SharedLoads, create_engine, typed_config
from qwen_gateway.errors import ModelNotFound, StartupError
from qwen_gateway.service.admission import Admission
from qwen_gateway.service.catalog import ModelSpec, resolve_spec
from qwen_gateway.settings import ModelConfig, Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServedModel:
    config: ModelConfig
    engine: Engine
    spec: ModelSpec
    admission: Admission

    @classmethod
    def build(cls, config: ModelConfig, engine: Engine) -> ServedModel:
        """A started engine with its effective catalog spec and its admission bounds."""
        return cls(config, engine, resolve_spec(config, engine.capabilities), admission_for(config, engine))

    @property
    def id(self) -> str:
        return self.config.id


@dataclass(frozen=True, slots=True)
class ModelStatus:
    id: str
    engine: str
    health: EngineHealth
    queued: int
    queue_limit: int


def admission_for(config: ModelConfig, engine: Engine) -> Admission:
    """The engine runs ``max_concurrency`` sequences at once; by default twice that may wait."""
    running = max(1, engine.capabilities.max_concurrency)
    queue = config.max_queue if config.max_queue is not None else 2 * running
    return Admission(running=running, queue=queue)


class ModelRegistry:
    """Model id -> served model. Built once at startup; ids are case-sensitive, like DashScope's."""

    def __init__(self, models: list[ServedModel]) -> None:
        self._models = {m.id: m for m in models}

    @classmethod
    async def start(cls, configs: tuple[ModelConfig, ...], settings: Settings) -> ModelRegistry:
        """Create and start every engine, one after another (loading two checkpoints at once only
        competes for memory and disk). Any failure closes what was started and raises StartupError."""
        # Every entry's options are checked before the first model loads: a typo in the last entry
        # must not cost the load time of all the others.
        for config in configs:
            typed_config(config)
        started: list[ServedModel] = []
        # Loads the engines share (a checkpoint's tokenizers, for the entries on one checkpoint): this
        # start's own, gone once every engine holds what it took.
        shared = SharedLoads()
        try:
            for config in configs:
                engine = create_engine(config, settings, shared=shared)
                await engine.start()
                started.append(ServedModel.build(config, engine))
        except BaseException:
            for served in started:
                await served.engine.aclose()
            raise
        if not started:
            raise StartupError("no model configured")
        return cls(started)

    def get(self, model_id: str) -> ServedModel:
        try:
            return self._models[model_id]
        except KeyError:
            raise ModelNotFound(model_id) from None

    def admission_of(self, model_id: object) -> Admission | None:
        """The admission bounds of ``model_id`` if it is served (None: unknown, or not a string)."""
        served = self._models.get(model_id) if isinstance(model_id, str) else None
        return None if served is None else served.admission

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    async def statuses(self) -> list[ModelStatus]:
        out = []
        for served in self._models.values():
            try:
                health = await served.engine.health()
            except Exception as exc:  # a broken engine must not break /health itself
                log.warning("health check of %s failed: %s", served.id, exc)
                health = EngineHealth(EngineState.FAILED, 0, detail=type(exc).__name__)
            admission = served.admission
            queued = admission.queued if health.queued is None else health.queued
            out.append(ModelStatus(served.id, served.config.engine, health, queued, admission.queue))
        return out

    async def aclose(self) -> None:
        for served in self._models.values():
            try:
                await served.engine.aclose()
            except Exception:
                log.exception("closing engine of %s failed", served.id)
