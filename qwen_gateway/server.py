"""The composition root at the edge: bind the port, open the gateway, serve it over HTTP, close it.

It sits beside ``cli.py`` (not in ``service/``) because it is the one place that wires the API layer to
the services.

Lifecycle: the address is bound first (a busy port is one line, before any model loads); on SIGTERM or
SIGINT the server stops accepting, gives running requests ``shutdown_grace_seconds``, then ends what is
left through the app's :class:`~qwen_gateway.api.lifecycle.Shutdown` (in-band error + ``[DONE]``,
ledger rows with the tokens used), closes the gateway and returns: exit status 0, also for SIGTERM. A
second SIGINT skips the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import sys
import threading
from collections.abc import Generator
from types import FrameType

import uvicorn
from rich.console import Console

from qwen_gateway import __version__
from qwen_gateway.api.app import create_app
from qwen_gateway.api.lifecycle import Shutdown
from qwen_gateway.api.render.batches import FileLines
from qwen_gateway.edge import EdgeLimits, protocol_class
from qwen_gateway.listen import bind
from qwen_gateway.service.runtime import Gateway
from qwen_gateway.settings import Settings

log = logging.getLogger(__name__)

# Seconds requests get, after the grace period, to stop at a token boundary and write their error
# event, [DONE] and ledger row (lifecycle.STOP_AT_BOUNDARY_SECONDS of it to reach the boundary);
# whatever still runs then is cancelled.
WRAP_UP_SECONDS = 10.0
SWITCH_INTERVAL_SECONDS = 0.001


class GatewayServer(uvicorn.Server):
    """uvicorn's server with the gateway's shutdown: a grace period, then :meth:`Shutdown.expire`."""

    def __init__(self, config: uvicorn.Config, *, shutdown: Shutdown, grace: float) -> None:
        super().__init__(config)
        self.coordinator = shutdown
        self.grace = grace

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn's, minus the re-raise of the signal after serving: that re-raise is what made a
        # SIGTERM'd gateway die with 143 before its own shutdown (ledger rows, engine close) ran.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            log.info(
                "received %s: finishing running requests (grace %ss)", signal.Signals(sig).name, self.grace
            )
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        self.coordinator.begin()
        # Idle keep-alive connections close now; busy ones close after their response.
        for connection in list(self.server_state.connections):
            connection.shutdown()
        tasks = self.server_state.tasks
        if tasks and not await self._until_idle(self.grace):
            log.info("grace period over: stopping %d running request(s)", len(tasks))
            self.coordinator.expire()
            # The wrap-up is not cut short by a second Ctrl-C (that one only skips the grace): reaching
            # a token boundary takes milliseconds, and it gives every stream its in-band end and usage
            # instead of a dropped connection (and a cancelled task's traceback in the log).
            if not await self._until_idle(WRAP_UP_SECONDS, interruptible=False):
                for task in list(tasks):
                    task.cancel()
                await self._until_idle(WRAP_UP_SECONDS)
        for connection in list(self.server_state.connections):
            connection.shutdown()
        # Also after a second Ctrl-C: the app has no shutdown work of its own (the gateway closes in
        # serve()), and a lifespan left waiting is cancelled at exit with a traceback in the log.
        await self.lifespan.shutdown()

    async def _until_idle(self, timeout: float, *, interruptible: bool = True) -> bool:
        """Wait until no request task runs (True), ``timeout`` passes or (``interruptible``) a second
        Ctrl-C (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.server_state.tasks:
            if (interruptible and self.force_exit) or loop.time() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True


async def serve(settings: Settings, sockets: list[socket.socket] | None = None) -> None:
    """Bind (unless given bound ``sockets``), open the gateway, serve HTTP until SIGTERM/SIGINT,
    close everything. StartupError (busy port, bad checkpoint) propagates before anything is served.
    """
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # httpx logs every request's whole URL at INFO: the operator's search URL with any credentials in
    # it, the user's text as the search query, signed media URLs. Our own lines say what happened.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    # huggingface_hub's own client (httpx2) does the same for hub downloads (tokens in signed URLs).
    logging.getLogger("httpx2").setLevel(max(logging.WARNING, logging.getLogger().level))
    console = Console(stderr=True, soft_wrap=True)
    if sockets is None:
        sockets = bind(settings.host, settings.port)
    try:
        port = sockets[0].getsockname()[1]
        gateway = await Gateway.open(settings, console=console)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    try:
        app = create_app(gateway)
        # The batch worker renders its file lines with the API layer's shapes.
        gateway.batches.start(FileLines())
        limits = EdgeLimits(
            max_header_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            header_timeout=settings.header_timeout,
            body_idle_timeout=settings.body_idle_timeout,
            max_connections=settings.max_connections,
        )
        config = uvicorn.Config(
            app,
            http=protocol_class(limits),
            log_level=settings.log_level,
            timeout_keep_alive=settings.idle_connection_timeout,
            log_config=None,
        )
        server = GatewayServer(config, shutdown=app.state.shutdown, grace=settings.shutdown_grace_seconds)
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        base = f"http://{host}:{port}"
        console.print(f"qwen-gateway {__version__}: models {', '.join(m.id for m in gateway.models)}")
        console.print(f"OpenAI-compatible base_url: [bold]{base}/compatible-mode/v1[/] (also {base}/v1)")
        if not await gateway.keys.list():
            console.print(
                "[yellow]No API key yet:[/] create one with "
                f"[green]qwen-gateway keys create --name me --home {settings.home}[/]"
            )
        # Everything loaded so far (the server stack, models, tokenizers) lives as long as the process:
        # moved out of the collector's generations, full collections no longer walk it, which is what
        # stalls a busy server for tens of milliseconds now and then.
        gc.collect()
        gc.freeze()
        # The event loop shares the GIL with the engines' inference threads: a shorter switch interval
        # (CPython's default is 5 ms) lets it answer (a 503, /health) without waiting out a decode
        # step's Python work.
        sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
        await server.serve(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
        await gateway.aclose()
        print("qwen-gateway stopped", file=sys.stderr)
