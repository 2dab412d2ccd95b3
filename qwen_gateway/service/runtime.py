"""The composition root: open the store and the engines, wire the services, run the HTTP server."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass

from rich.console import Console

from qwen_gateway import __version__
from qwen_gateway.engines.base import Usage
from qwen_gateway.errors import StartupError
from qwen_gateway.service.chat import ChatService
from qwen_gateway.service.keys import KeyService
from qwen_gateway.service.models import ModelRegistry
from qwen_gateway.settings import ModelConfig, Settings
from qwen_gateway.store.db import Store
from qwen_gateway.store.usage import record_usage

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Gateway:
    """Everything a request needs, opened once at startup and passed to the app factory."""

    settings: Settings
    store: Store
    keys: KeyService
    models: ModelRegistry
    chat: ChatService
    started_at: int

    @classmethod
    async def open(cls, settings: Settings, *, console: Console | None = None) -> Gateway:
        settings.home.mkdir(parents=True, exist_ok=True)
        store = await Store.open(settings.resolved_database_url)
        try:
            configs = settings.models or await _embedded_models(settings, console)
            models = await ModelRegistry.start(configs, settings)
        except BaseException:
            await store.aclose()
            raise

        async def sink(request_id: str, key_id: str | None, model: str, status: str, usage: Usage) -> None:
            await record_usage(
                store=store,
                request_id=request_id,
                key_id=key_id,
                model=model,
                endpoint="chat.completions",
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                status=status,
            )

        return cls(
            settings=settings,
            store=store,
            keys=KeyService(store),
            models=models,
            chat=ChatService(sink),
            started_at=int(time.time()),
        )

    async def aclose(self) -> None:
        await self.models.aclose()
        await self.store.aclose()


async def _embedded_models(settings: Settings, console: Console | None) -> tuple[ModelConfig, ...]:
    if not settings.embedded_default:
        raise StartupError("no model configured: pass --model ID=PATH or a config file with [[models]]")
    from qwen_gateway.engines.local.embedded import EMBEDDED_MODEL_ID, ensure_embedded_model

    path = await asyncio.to_thread(ensure_embedded_model, settings.home)
    if console is not None:
        console.print(
            f"[bold]No model configured:[/] serving the embedded default [cyan]{EMBEDDED_MODEL_ID}[/] "
            "(SmolLM2-135M-Instruct, Apache-2.0).\n"
            "To serve Qwen models: [green]qwen-gateway serve --model qwen-plus=/path/to/Qwen2.5-7B-Instruct"
            "[/] or a config file with [[models]] entries (see README)."
        )
    return (ModelConfig(id=EMBEDDED_MODEL_ID, engine="local", path=str(path), embedded=True),)


async def serve(settings: Settings) -> None:
    """Open the gateway, serve HTTP until interrupted, close everything. StartupError propagates."""
    import uvicorn

    from qwen_gateway.api.app import create_app

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    console = Console(stderr=True)
    gateway = await Gateway.open(settings, console=console)
    try:
        config = uvicorn.Config(
            create_app(gateway),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            timeout_graceful_shutdown=5,
            log_config=None,
        )
        server = uvicorn.Server(config)
        base = f"http://{settings.host}:{settings.port}"
        console.print(f"qwen-gateway {__version__}: models {', '.join(m.id for m in gateway.models)}")
        console.print(f"OpenAI-compatible base_url: [bold]{base}/compatible-mode/v1[/] (also {base}/v1)")
        if not await gateway.keys.list():
            console.print(
                "[yellow]No API key yet:[/] create one with "
                f"[green]qwen-gateway keys create --name me --home {settings.home}[/]"
            )
        await server.serve()
        if not server.started:
            raise StartupError(f"could not listen on {settings.host}:{settings.port}")
    finally:
        await gateway.aclose()
        print("qwen-gateway stopped", file=sys.stderr)
