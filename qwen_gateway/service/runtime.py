"""The gateway: the store, the engines and the services, opened together at startup."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape

from qwen_gateway.engines.base import Usage
from qwen_gateway.errors import StartupError
from qwen_gateway.media import MediaFetcher
from qwen_gateway.service.chat import ChatService
from qwen_gateway.service.keys import KeyService
from qwen_gateway.service.ledger import LedgerWriter
from qwen_gateway.service.models import ModelRegistry
from qwen_gateway.settings import ModelConfig, Settings
from qwen_gateway.store.db import Store
from qwen_gateway.store.usage import NewUsage

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Gateway:
    """Everything a request needs, opened once at startup and passed to the app factory."""

    settings: Settings
    store: Store
    keys: KeyService
    models: ModelRegistry
    chat: ChatService
    ledger: LedgerWriter
    started_at: int
    # Fetches and checks the images and videos of requests (qwen_gateway/media).
    media: MediaFetcher

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

        return cls.assemble(settings, store, models)

    @classmethod
    def assemble(cls, settings: Settings, store: Store, models: ModelRegistry) -> Gateway:
        """Wire the services over an opened store and started models."""
        writer = LedgerWriter(store)

        # The chat service's UsageSink: the row joins the writer's next batch; the answer waits for that
        # shared commit (no disk flush, no lock wait; see service/ledger.py), not for one of its own.
        async def ledger(request_id: str, key_id: str | None, model: str, status: str, usage: Usage) -> None:
            await writer.record(
                NewUsage(
                    request_id=request_id,
                    key_id=key_id,
                    model=model,
                    endpoint="chat.completions",
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    status=status,
                )
            )

        return cls(
            settings=settings,
            store=store,
            keys=KeyService(store),
            models=models,
            chat=ChatService(ledger),
            ledger=writer,
            started_at=int(time.time()),
            media=MediaFetcher(settings.media),
        )

    async def aclose(self) -> None:
        """Close engines, then the ledger writer (flushing every row), then the store.

        A cancellation while closing does not cut this short: it is held until everything is closed and
        then re-raised. (After SIGINT, uvicorn re-raises the signal once it has stopped serving, and
        asyncio.run turns that into a cancellation of the main task, i.e. of whoever awaits this; cut
        short, the last usage rows would be lost and the engine's thread left running.)
        """
        closing = asyncio.ensure_future(self._close())
        cancelled = False
        while not closing.done():
            try:
                await asyncio.shield(closing)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError
        closing.result()

    async def _close(self) -> None:
        # Engines first: closing them ends their generations, whose requests then hand over their last
        # usage rows; the writer then flushes every row before the store goes.
        try:
            await self.models.aclose()
        finally:
            try:
                await self.ledger.aclose()
            finally:
                try:
                    await self.store.aclose()
                finally:
                    await self.media.aclose()


async def _embedded_models(settings: Settings, console: Console | None) -> tuple[ModelConfig, ...]:
    if not settings.embedded_default:
        raise StartupError("no model configured: pass --model ID=PATH or a config file with [[models]]")
    from qwen_gateway.engines.local.embedded import EMBEDDED_MODEL_ID, ensure_embedded_model
    from qwen_gateway.engines.local.options import LocalModelConfig

    if console is not None:
        # Said before any fetch, so a first start explains why it is downloading.
        console.print(
            f"[bold]No model configured:[/] serving the embedded default [cyan]{EMBEDDED_MODEL_ID}[/] "
            "(SmolLM2-135M-Instruct, Apache-2.0).\n"
            "To serve Qwen models: [green]qwen-gateway serve --model qwen-plus=/path/to/Qwen2.5-7B-Instruct"
            f"[/] or a config file with {escape('[[models]]')} entries (see README)."
        )
    path = await asyncio.to_thread(ensure_embedded_model, settings.home, console)
    return (
        LocalModelConfig(
            id=EMBEDDED_MODEL_ID,
            engine="local",
            path=str(path),
            embedded=True,
            temperature=0.2,
            top_p=0.9,
            repetition_penalty=1.15,
            max_output=1024,
        ),
    )
