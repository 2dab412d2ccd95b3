"""The gateway: the store, the engines and the services, opened together at startup."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from sqlalchemy import Connection

from qwen_gateway.errors import StartupError
from qwen_gateway.media import MediaFetcher
from qwen_gateway.search import create_provider as create_search_provider
from qwen_gateway.service.admin import AdminService
from qwen_gateway.service.batches import BatchService
from qwen_gateway.service.chat import ChatService
from qwen_gateway.service.files import FileService
from qwen_gateway.service.keys import KeyService
from qwen_gateway.service.ledger import LedgerWriter
from qwen_gateway.service.metrics import Metrics
from qwen_gateway.service.models import ModelRegistry
from qwen_gateway.service.money.meter import Meter
from qwen_gateway.service.search import WebSearch
from qwen_gateway.settings import ModelConfig, Settings
from qwen_gateway.store.db import Store
from qwen_gateway.store.money import settle, settle_async, settle_sync
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
    meter: Meter
    started_at: int
    admin: AdminService
    # Fetches and checks the images and videos of requests (qwen_gateway/media).
    media: MediaFetcher
    # Web search for enable_search (a provider from [search], or none).
    search: WebSearch
    # Uploaded files and their extracted text (Files API, Qwen-Long's fileid://).
    files: FileService
    metrics: Metrics
    # The Batch API and its worker (started by the server with the API layer's line renderer).
    batches: BatchService

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
        try:
            gateway = cls.assemble(settings, store, models)
            await gateway.meter.start()
            await gateway.files.start()
        except BaseException:
            await models.aclose()
            await store.aclose()
            raise
        log.info("%s", gateway.search.startup_line())
        return gateway

    @classmethod
    def assemble(cls, settings: Settings, store: Store, models: ModelRegistry) -> Gateway:
        """Wire the services over an opened store and started models."""
        # Every ledger row goes through one group-committing writer; its batch transaction also settles
        # the metered rows in it (hold released, cost charged: store/money.settle), so the answer waits
        # for one shared commit (no disk flush, no lock wait; see service/ledger.py), not one of its own.
        # Admissions (Meter.admit through writer.run) join the same batches: one transaction and one
        # commit for whatever queued up together.
        writer = LedgerWriter(store, write=settle_async, write_sync=settle_sync, in_transaction=_settle_rows)
        meter = Meter(
            writer,
            Meter.prices_of(models),
            retention_days=settings.usage_retention_days,
            hold_max_seconds=settings.hold_max_seconds,
            sweep_seconds=settings.sweep_seconds,
        )
        keys = KeyService(store)
        metrics = Metrics()
        metrics.watch_models(models)
        metrics.watch_ledger(writer)
        files = FileService(store, settings.files, settings.home)
        media = MediaFetcher(settings.media)
        search = WebSearch(create_search_provider(settings.search), settings.search)
        batches = BatchService(
            store=store,
            settings=settings.batches,
            models=models,
            meter=meter,
            writer=writer,
            files=files,
            media=media,
            search=search,
            metrics=metrics,
            max_files_per_request=settings.files.max_files_per_request,
        )
        return cls(
            settings=settings,
            store=store,
            keys=keys,
            models=models,
            chat=ChatService(meter.settle, meter.admit, metrics),
            ledger=writer,
            meter=meter,
            started_at=int(time.time()),
            admin=AdminService(store, keys, meter),
            media=media,
            search=search,
            files=files,
            metrics=metrics,
            batches=batches,
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
        # The batch worker first (its running lines go back to pending, their holds given back, through
        # the writer). Engines next: closing them ends their generations, whose requests then hand over
        # their last usage rows (each settling its hold); the writer then flushes every row, the meter
        # unregisters this process (no hold of it is left), and the store goes.
        try:
            await self.batches.aclose()
            await self.models.aclose()
        finally:
            try:
                await self.ledger.aclose()
            finally:
                try:
                    await self.meter.aclose()
                finally:
                    try:
                        await self.store.aclose()
                    finally:
                        try:
                            await self.media.aclose()
                        finally:
                            await self.search.aclose()


async def _embedded_models(settings: Settings, console: Console | None) -> tuple[ModelConfig, ...]:
    if not settings.embedded_default:
        raise StartupError("no model configured: pass --model ID=PATH or a config file with [[models]]")
    if settings.embedded == "qwen":
        return (await _embedded_qwen(settings, console),)
    from qwen_gateway.engines.local.embedded import (
        EMBEDDED_MODEL_ID,
        embedded_model_config,
        ensure_embedded_model,
    )

    if console is not None:
        # Said before any fetch, so a first start explains why it is downloading.
        console.print(
            f"[bold]No model configured:[/] serving the embedded default [cyan]{EMBEDDED_MODEL_ID}[/] "
            "(SmolLM2-135M-Instruct, Apache-2.0).\n"
            "To serve Qwen models: [green]qwen-gateway serve --model qwen-plus=/path/to/Qwen2.5-7B-Instruct"
            f"[/] or a config file with {escape('[[models]]')} entries (see README)."
        )
    path = await asyncio.to_thread(ensure_embedded_model, settings.home, console)
    return (embedded_model_config(path),)


async def _embedded_qwen(settings: Settings, console: Console | None) -> ModelConfig:
    from qwen_gateway.engines.local.embedded import embedded_model_config
    from qwen_gateway.engines.local.embedded_qwen import (
        HUB_REPO,
        QWEN_EMBEDDED_DEFAULTS,
        QWEN_EMBEDDED_ID,
        ensure_qwen_embedded,
    )

    console = console or Console(stderr=True, soft_wrap=True)
    console.print(
        f"[bold]No model configured:[/] serving the Qwen embedded default [cyan]{QWEN_EMBEDDED_ID}[/] "
        f"(Qwen2.5-0.5B-Instruct Q4_K_M from {HUB_REPO}, Apache-2.0)."
    )
    path = await asyncio.to_thread(
        ensure_qwen_embedded, settings.home, console, allow_downloads=settings.allow_downloads
    )
    return embedded_model_config(path, QWEN_EMBEDDED_ID, QWEN_EMBEDDED_DEFAULTS)


def _settle_rows(conn: Connection, rows: Sequence[NewUsage]) -> list[int | None]:
    return settle(conn, rows=rows)
