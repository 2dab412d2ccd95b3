"""The composition root at the edge: open the gateway, serve it over HTTP, close it.

It sits beside ``cli.py`` (not in ``service/``) because it is the one place that wires the API layer to
the services.
"""

from __future__ import annotations

import logging
import sys

import uvicorn
from rich.console import Console

from qwen_gateway import __version__
from qwen_gateway.api.app import create_app
from qwen_gateway.errors import StartupError
from qwen_gateway.service.runtime import Gateway
from qwen_gateway.settings import Settings


async def serve(settings: Settings) -> None:
    """Open the gateway, serve HTTP until interrupted, close everything. StartupError propagates."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    console = Console(stderr=True, soft_wrap=True)
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
