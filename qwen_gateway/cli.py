"""The ``qwen-gateway`` command: run the server and manage API keys.

Every command reads settings the same way as the server (defaults < ``QWEN_GATEWAY_*`` environment <
``--config`` file < flags), so ``keys`` commands find the same database a ``serve`` with the same
``--home``/``--config`` uses. Errors the user can fix are one ``error: ...`` line and exit status 1.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from qwen_gateway import __version__
from qwen_gateway.errors import GatewayError
from qwen_gateway.settings import ModelConfig, Settings

if TYPE_CHECKING:
    from qwen_gateway.service.keys import KeyService
    from qwen_gateway.store.db import Store
    from qwen_gateway.store.keys import KeyRow

# The database stack (SQLAlchemy) is imported when a command first needs it, not with this module:
# `serve` checks its port before paying for it (issue 7: a busy port is one line, at once).

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(1)


def _location_options(func: F) -> F:
    """``--home``, ``--config`` and ``--database-url``, shared by every command."""
    func = click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="TOML config file ([server] settings and [[models]] entries).",
    )(func)
    # No click envvar/default here: Settings reads QWEN_GATEWAY_HOME itself, so a config file's `home`
    # still beats the environment and only an explicit flag beats both.
    # Not a parameter of every command function: stored on the context and read by _load_settings,
    # so each command gets it without repeating it in its signature.
    func = click.option(
        "--database-url",
        metavar="URL",
        default=None,
        expose_value=False,
        callback=_remember_database_url,
        help="Database, e.g. postgresql://user:password@host/dbname or sqlite:////path/gateway.db. "
        "Env: QWEN_GATEWAY_DATABASE_URL. [default: SQLite file gateway.db in --home]",
    )(func)
    func = click.option(
        "--home",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Data directory (database, downloaded models). Env: QWEN_GATEWAY_HOME. "
        "[default: ~/.qwen-gateway]",
    )(func)
    return func


def _remember_database_url(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.meta["qwen_gateway.database_url"] = value


def _load_settings(
    config_file: Path | None,
    overrides: dict[str, Any],
    extra_models: tuple[ModelConfig, ...] = (),
) -> Settings:
    context = click.get_current_context(silent=True)
    if context is not None and "database_url" not in overrides:
        overrides = {**overrides, "database_url": context.meta.get("qwen_gateway.database_url")}
    return Settings.load(config_file=config_file, overrides=overrides, extra_models=extra_models)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one async command body, turning expected failures into one line and exit status 1."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return asyncio.run(coro)
    except GatewayError as exc:
        _fail(str(exc))
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None)
        _fail(f"database error: {orig if orig is not None else exc}")


async def _open_store(settings: Settings) -> Store:
    from qwen_gateway.store.db import Store

    return await Store.open(settings.resolved_database_url)


def _keys(store: Store) -> KeyService:
    from qwen_gateway.service.keys import KeyService

    return KeyService(store)


def _guarded(func: F) -> F:
    """Settings problems (bad config file, bad flag) become one ``error:`` line, exit status 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except GatewayError as exc:
            _fail(str(exc))

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qwen-gateway")
def cli() -> None:
    """A self-hosted server for Qwen models that speaks DashScope's API.

    Start with `qwen-gateway serve`, then create a key with `qwen-gateway keys create --name me`.
    """


@cli.command()
@_location_options
@click.option("--host", default=None, help="Address to listen on. [default: 127.0.0.1]")
@click.option("--port", type=int, default=None, help="Port to listen on. [default: 8000]")
@click.option(
    "--model",
    "models",
    multiple=True,
    metavar="ID=PATH",
    help="Serve the checkpoint at PATH (directory, .gguf file or Hugging Face repo id) as model ID. "
    "Repeatable; added to the config file's [[models]].",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default=None,
    help="Server log level. [default: info]",
)
@_guarded
def serve(
    home: Path | None,
    config_file: Path | None,
    host: str | None,
    port: int | None,
    models: tuple[str, ...],
    log_level: str | None,
) -> None:
    """Run the HTTP server until interrupted (Ctrl-C).

    With no model configured it serves a small embedded default model so the API can be tried at once.
    """
    extra = tuple(ModelConfig.from_flag(m) for m in models)
    settings = _load_settings(
        config_file, {"home": home, "host": host, "port": port, "log_level": log_level}, extra
    )
    # The address first: a busy port is one line before the server stack is imported or a model
    # loaded. The server stack (FastAPI, uvicorn, engines) is only needed by this command.
    from qwen_gateway.listen import bind

    sockets = bind(settings.host, settings.port)
    from qwen_gateway.server import serve as run_server

    try:
        _run(run_server(settings, sockets))
    except KeyboardInterrupt:
        sys.exit(0)


@cli.group()
def keys() -> None:
    """Create, list and revoke API keys (stored hashed in the gateway's database)."""


@keys.command("create")
@click.option("--name", required=True, help="A unique name for the key, e.g. who or what uses it.")
@_location_options
@_guarded
def keys_create(name: str, home: Path | None, config_file: Path | None) -> None:
    """Create an API key and print it. The key is shown only this once."""
    settings = _load_settings(config_file, {"home": home})

    async def create() -> tuple[KeyRow, str]:
        async with await _open_store(settings) as store:
            return await _keys(store).create(name)

    row, raw_key = _run(create())
    click.echo(f"Created key {row.name!r} (id {row.id})")
    click.echo(raw_key)
    click.echo("Store it now: it will not be shown again.", err=True)


@keys.command("list")
@_location_options
@_guarded
def keys_list(home: Path | None, config_file: Path | None) -> None:
    """List API keys (never the keys themselves)."""
    settings = _load_settings(config_file, {"home": home})

    async def fetch() -> list[KeyRow]:
        async with await _open_store(settings) as store:
            return await _keys(store).list()

    rows = _run(fetch())
    console = Console(highlight=False)
    if not console.is_terminal:
        # Piped or captured: no terminal width to fit, so never fold a column.
        console = Console(highlight=False, width=1_000)
    if not rows:
        console.print("No API keys yet. Create one with: qwen-gateway keys create --name NAME")
        return
    table = Table(box=None, pad_edge=False)
    table.add_column("ID", no_wrap=True)
    table.add_column("NAME", overflow="fold", min_width=8)
    table.add_column("PREFIX", no_wrap=True)
    table.add_column("CREATED (UTC)", no_wrap=True)
    table.add_column("STATUS", no_wrap=True)
    for row in rows:
        status = "active" if row.revoked_at is None else f"revoked {_when(row.revoked_at)}"
        table.add_row(row.id, escape(row.name), row.prefix, _when(row.created_at), status)
    console.print(table)


@keys.command("revoke")
@click.argument("key")
@_location_options
@_guarded
def keys_revoke(key: str, home: Path | None, config_file: Path | None) -> None:
    """Revoke the key whose name or id is KEY. Requests using it are refused from then on.

    A running server notices within a few seconds (it caches valid keys briefly).
    """
    settings = _load_settings(config_file, {"home": home})

    async def revoke() -> tuple[KeyRow | None, KeyRow | None]:
        async with await _open_store(settings) as store:
            service = _keys(store)
            before = await service.get(key)
            return before, await service.revoke(key)

    before, after = _run(revoke())
    if after is None:
        _fail(f"no API key with name or id {key!r} (see: qwen-gateway keys list)")
    if before is not None and before.revoked_at is not None:
        click.echo(f"Key {after.name!r} (id {after.id}) was already revoked on {_when(before.revoked_at)}.")
    else:
        click.echo(f"Revoked key {after.name!r} (id {after.id}).")


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M")


def main() -> None:
    """Console entry point (``qwen-gateway``)."""
    cli(prog_name="qwen-gateway")
