"""The meter: admission (rate limits and the balance hold) before a request runs, settlement after.

Per request of a metered or rate-limited key:

1. **Admission** (``store/money.admit_many``), committed before the engine sees the request, in the ledger
   writer's next batch transaction (admissions and settlements that queue up together share one
   commit): the key's row is written first (that serialises admissions of one key across processes),
   its RPM/TPM window is checked, then ``UPDATE api_keys SET balance = balance - hold WHERE balance >=
   hold`` takes the hold (the bound of the prompt's tokens plus every choice's worst case, ``estimate.py``,
   at the model's prices) and a ``holds`` row records it. Refused: 400 ``Arrearage`` or 429, nothing moved.
2. **Settlement**, when the request ends however it ends: its ledger row goes to the ledger writer's
   next batch, whose transaction also deletes the hold, gives back the hold and charges the exact
   cost (prompt + generated tokens; nothing for a failure before the first token). The answer (or the
   stream's end) waits for that commit, so the balance after the charge is known for
   ``X-Account-Balance``.

Keys that are neither metered nor limited cost nothing here: no transaction at admission, and their
ledger rows keep the writer's plain group commit.

Crashes: every server process registers itself (``gateway_instances``) and writes a heartbeat every
:data:`HEARTBEAT_SECONDS`. At startup and then every ``sweep_seconds`` (the setting, default
:data:`SWEEP_SECONDS`), holds of dead processes
(same host and pid gone, or no heartbeat for :data:`STALE_SECONDS`) are given back and their requests
written to the ledger as "expired" (charged nothing: what they generated died with them); holds older
than ``hold_max_seconds`` are given back whoever owns them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import Connection

from qwen_gateway.engines.base import Usage
from qwen_gateway.errors import (
    Arrearage,
    AuthenticationError,
    QuotaExceeded,
    RateLimited,
    StartupError,
)
from qwen_gateway.service.ledger import LedgerWriter
from qwen_gateway.service.money.estimate import completion_tokens_bound, prompt_tokens_bound
from qwen_gateway.service.money.prices import InvalidAmount, Price, cost_micro, price_per_1k
from qwen_gateway.service.validation import ChatCall
from qwen_gateway.store import money
from qwen_gateway.store import prices as store_prices
from qwen_gateway.store.keys import KeyRow
from qwen_gateway.store.rollup import roll_up
from qwen_gateway.store.usage import NewUsage

log = logging.getLogger(__name__)

T = TypeVar("T")

HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 60.0
SWEEP_SECONDS = 30.0
ROLLUP_SECONDS = 3600.0
# How often each process reads the price overrides: a price edited through another process sharing the
# database applies here to requests admitted at most this long after the change (the process that made
# the change applies it at once).
PRICE_REFRESH_SECONDS = 2.0


@dataclass(slots=True)
class Account:
    """The key a request is made with, when it is metered or limited, and where its money stands.

    ``balance_micro`` is what ``X-Account-Balance`` shows: after the hold while the request runs, after
    the charge once it is settled (None: not known yet, the header is then read from the database).
    """

    key: KeyRow
    balance_micro: int | None = None
    admitted: bool = False
    held_micro: int | None = None
    rate_second: int | None = None
    rate_tokens: int = 0
    # The model's price when the request was admitted: what its hold was made of and what it is charged
    # (a price edited while it runs applies to later requests only).
    price: Price | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def metered(self) -> bool:
        return self.key.metered


class Meter:
    """Prices, admission and settlement over the ledger writer's connection (see the module docstring)."""

    def __init__(
        self,
        writer: LedgerWriter,
        prices: dict[str, Price],
        *,
        retention_days: int = 90,
        hold_max_seconds: float = 86_400.0,
        sweep_seconds: float = SWEEP_SECONDS,
        clock: Callable[[], Any] = money.utcnow,
    ) -> None:
        self._writer = writer
        # The catalog's / [[models]] prices (what a reset goes back to), and the prices in force: those
        # with the database's overrides applied (refresh_prices).
        self._defaults = dict(prices)
        self._prices = dict(prices)
        self._overridden: set[str] = set()
        self._retention_days = retention_days
        self._hold_max = timedelta(seconds=hold_max_seconds)
        self._sweep_seconds = sweep_seconds
        self._clock = clock
        self.instance_id = "gw_" + secrets.token_hex(8)
        self._hostname = socket.gethostname()
        self._task: asyncio.Task[None] | None = None
        self._price_task: asyncio.Task[None] | None = None
        self._sweep_task: asyncio.Task[None] | None = None

    @staticmethod
    def prices_of(models: Any) -> dict[str, Price]:
        """Each served model's price; a price that is not a whole number of micro-CNY stops startup."""
        out: dict[str, Price] = {}
        for served in models:
            spec = served.spec
            try:
                out[served.id] = price_per_1k(spec.input_price, spec.output_price)
            except InvalidAmount as exc:
                raise StartupError(f"model {served.id!r}: invalid price: {exc}") from None
        return out

    def price(self, model_id: str) -> Price:
        """The price in force for ``model_id`` (an override, else the default)."""
        return self._prices.get(model_id, Price(0, 0))

    def default_price(self, model_id: str) -> Price:
        """The catalog's / ``[[models]]`` entry's price, which a reset goes back to."""
        return self._defaults.get(model_id, Price(0, 0))

    def overridden(self, model_id: str) -> bool:
        return model_id in self._overridden

    def serves(self, model_id: str) -> bool:
        return model_id in self._defaults

    def _apply(self, overrides: dict[str, tuple[int, int]]) -> None:
        # Overrides of models this process does not serve are kept in the database and ignored here.
        prices = dict(self._defaults)
        overridden = set()
        for model, (input_micro, output_micro) in overrides.items():
            if model in prices:
                prices[model] = Price(input_micro, output_micro)
                overridden.add(model)
        self._prices, self._overridden = prices, overridden

    async def refresh_prices(self) -> None:
        """Read the price overrides from the database and put them in force."""
        async with self._writer.store_connection() as conn:
            self._apply(await conn.run_sync(store_prices.read_overrides))

    async def set_price(self, model_id: str, price: Price | None, *, admin_key_id: str) -> Price:
        """Set ``model_id``'s price (None: back to its default), audited, in force here at once and in
        the other processes within :data:`PRICE_REFRESH_SECONDS`. Returns the price in force before."""
        default = self.default_price(model_id)
        now = self._clock()
        old_override: tuple[int, int] | None

        def write(conn: Connection) -> tuple[int, int] | None:
            base = (default.input_per_1k, default.output_per_1k)
            if price is None:
                return store_prices.remove_override(
                    conn, model=model_id, default=base, admin_key_id=admin_key_id, now=now
                )
            return store_prices.set_override(
                conn,
                model=model_id,
                price=(price.input_per_1k, price.output_per_1k),
                default=base,
                admin_key_id=admin_key_id,
                now=now,
            )

        before = self.price(model_id)
        old_override = await self._writer.run(write)
        await self.refresh_prices()
        if old_override is not None:
            before = Price(*old_override)
        return before

    async def price_history(self, *, limit: int = 100) -> list[store_prices.PriceChange]:
        async with self._writer.store_connection() as conn:
            return await conn.run_sync(lambda c: store_prices.history(c, limit=limit))

    # -- admission -----------------------------------------------------------------------------------

    def account_for(self, key: KeyRow) -> Account | None:
        """An :class:`Account` for a metered or limited key; None for a plain one (nothing to do)."""
        if key.metered or key.limited:
            return Account(key)
        return None

    def hold_for(self, call: ChatCall, price: Price | None = None) -> tuple[int, int]:
        """(tokens, micro-CNY) the call holds: its prompt's bound (counted once: the choices share it)
        plus every choice's worst case (``max_tokens``, and its reasoning budget while thinking)."""
        # A web search still to run (after admission) adds at most its reserve to the prompt.
        prompt = prompt_tokens_bound(call.generation) + call.search_reserve
        # A prompt can't be longer than the engine's context (it is refused before it runs): without
        # this cap, a prompt far past the context held more than any key has and was refused as
        # Arrearage instead of getting the engine's "Range of input length" 400. 0: not declared.
        context = call.model.engine.capabilities.max_context
        if context > 0:
            prompt = min(prompt, context)
        completion = completion_tokens_bound(call.generation, call.n)
        price = self.price(call.model.id) if price is None else price
        return prompt + completion, cost_micro(price, prompt, completion)

    async def admit(self, call: ChatCall, account: Account) -> None:
        """Check the key's limits and take its hold, or raise Arrearage / RateLimited / QuotaExceeded.

        The transaction is shielded: if the caller is cancelled meanwhile, the outcome is still
        recorded on ``account`` (so the caller's settlement gives back a hold taken), then the
        cancellation goes on.
        """
        account.price = self.price(call.model.id)
        tokens, hold = self.hold_for(call, account.price)
        account.rate_tokens = tokens
        key = account.key
        now = self._clock()

        request = money.HoldRequest(
            key_id=key.id,
            request_id=call.request_id,
            model=call.model.id,
            owner=self.instance_id,
            now=now,
            hold_micro=hold,
            tokens=tokens,
            limited_hint=key.limited,
            endpoint=call.endpoint,
        )
        # With the other admissions of the writer's next batch: a key's holds cost one UPDATE and one
        # INSERT for all of them (store/money.admit_many).
        work: asyncio.Future[money.Admitted | money.Refused] | None
        work = self._writer.submit_grouped(money.admit_many, request)
        if work is None:
            work = asyncio.ensure_future(self._writer.run_grouped(money.admit_many, request))
        try:
            outcome = await asyncio.shield(work)
        except asyncio.CancelledError:
            # The hold may be taken all the same: its outcome goes on the account (so that the
            # caller's settlement gives it back) before the cancellation goes on, even if this task is
            # cancelled again meanwhile (an unshielded wait would then cancel the result itself, and
            # the hold would stay taken, unsettled, until hold_max_seconds).
            while not work.done():
                try:
                    await asyncio.shield(work)
                except asyncio.CancelledError:
                    continue
                except Exception:
                    break
            if work.cancelled():
                log.error("admission of request %s was cancelled in the writer", call.request_id)
            elif (error := work.exception()) is not None:
                log.error("admission of request %s failed while cancelled", call.request_id, exc_info=error)
            else:
                self._record(account, work.result())
            raise
        self._record(account, outcome)
        if isinstance(outcome, money.Refused):
            if outcome.reason == "balance":
                raise Arrearage()
            if outcome.reason == "unknown":  # the key was deleted since it was authenticated
                raise AuthenticationError()
            if outcome.reason == "rpm":
                raise RateLimited(retry_after=outcome.retry_after)
            raise QuotaExceeded(retry_after=outcome.retry_after)

    @staticmethod
    def _record(account: Account, outcome: money.Admitted | money.Refused) -> None:
        account.balance_micro = outcome.balance_micro
        if isinstance(outcome, money.Admitted):
            account.admitted = True
            account.held_micro = outcome.held_micro
            account.rate_second = outcome.rate_second

    # -- settlement ----------------------------------------------------------------------------------

    async def settle(
        self,
        call: ChatCall,
        *,
        key_id: str | None,
        status: str,
        usage: Usage,
        account: Account | None,
        latency_ms: int,
    ) -> None:
        """Write the request's ledger row; for an admitted account also release its hold and charge it,
        in the same transaction (the ledger writer's batch). Updates ``account.balance_micro``.

        ``cost_micro`` is what the key is charged: set only for a request that took a hold (at the price
        it was admitted at), NULL for an unmetered key's request, which is charged nothing."""
        model = call.model.id
        charged = account is not None and account.admitted and account.held_micro is not None
        cost: int | None = None
        if charged:
            assert account is not None
            price = account.price if account.price is not None else self.price(model)
            cost = cost_micro(price, usage.prompt_tokens, usage.completion_tokens)
        row = NewUsage(
            request_id=call.request_id,
            key_id=key_id,
            model=model,
            endpoint=call.endpoint,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            image_tokens=usage.image_tokens,
            video_tokens=usage.video_tokens,
            status=status,
            cost_micro=cost,
            latency_ms=latency_ms,
            usage_source="local" if usage.counted_locally else "engine",
            held_micro=account.held_micro if account is not None and account.admitted else None,
            rate_second=account.rate_second if account is not None and account.admitted else None,
            rate_tokens=account.rate_tokens if account is not None else 0,
        )
        balance = await self._writer.record(row)
        if account is not None and balance is not None:
            account.balance_micro = balance

    async def balance(self, key_id: str) -> int | None:
        """The key's balance now (holds taken out), from the database. A plain read on a connection of
        its own: a read-only job in a write batch would make SQLite upgrade a read transaction, which
        fails at once (no busy wait) when another process wrote in between."""
        async with self._writer.store_connection() as conn:
            return await conn.run_sync(lambda sync: money.key_balance(sync, key_id=key_id))

    # -- process lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Register this process, give back dead processes' holds, roll up old ledger rows, and keep
        doing all three (and the heartbeat) in the background."""
        now = self._clock()
        await self._writer.run(
            lambda conn: money.register_instance(
                conn, instance_id=self.instance_id, hostname=self._hostname, pid=os.getpid(), now=now
            )
        )
        await self.sweep()
        await self.roll_up()
        await self.refresh_prices()
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._background(), name="money-heartbeat")
        self._price_task = loop.create_task(self._refresh_prices_forever(), name="money-prices")
        self._sweep_task = loop.create_task(self._sweep_forever(), name="money-sweep")

    async def _refresh_prices_forever(self) -> None:
        while True:
            await asyncio.sleep(PRICE_REFRESH_SECONDS)
            try:
                await self.refresh_prices()
            except Exception:  # a busy or briefly unreachable database: the prices in force stay
                log.exception("reading the price overrides failed")

    async def sweep(self) -> list[money.Released]:
        """Give back the holds no live process will settle (see store/money.release_stale_holds)."""
        now = self._clock()

        def release(conn: Connection) -> list[money.Released]:
            # Written first (the heartbeat): on SQLite a transaction that reads before its first write
            # fails at once, instead of waiting, when another process writes in between.
            money.heartbeat(conn, instance_id=self.instance_id, now=now)
            return money.release_stale_holds(
                conn,
                me=self.instance_id,
                hostname=self._hostname,
                pid_alive=_pid_alive,
                now=now,
                stale_after=timedelta(seconds=STALE_SECONDS),
                max_age=self._hold_max,
            )

        released = await self._writer.run(release)
        for r in released:
            why = "its server process died" if r.dead_owner else "it outlived hold_max_seconds"
            log.warning("released the hold of request %s (key %s): %s", r.request_id, r.key_id, why)
        return released

    async def roll_up(self) -> int:
        """Roll ledger rows older than the retention into daily totals; returns how many rows went."""
        now = self._clock()
        cutoff = now - timedelta(days=self._retention_days)

        def move(conn: Connection) -> int:
            money.heartbeat(conn, instance_id=self.instance_id, now=now)  # a write first (see sweep)
            return roll_up(conn, before=cutoff)

        total = 0
        while True:
            moved = await self._writer.run(move)
            total += moved
            if moved == 0:
                break
        if total:
            log.info(
                "usage: rolled %d ledger rows older than %d days into daily totals",
                total,
                self._retention_days,
            )
        return total

    async def _sweep_forever(self) -> None:
        # Its own task, on its own interval (which may be shorter than the heartbeat's).
        while True:
            await asyncio.sleep(self._sweep_seconds)
            try:
                await self.sweep()
            except Exception:  # a busy or briefly unreachable database: the next sweep tries again
                log.exception("sweeping dead processes' holds failed")

    async def _background(self) -> None:
        last_rollup = time.monotonic()
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                await self._writer.run(functools.partial(self._heartbeat, now=self._clock()))
                if time.monotonic() - last_rollup >= ROLLUP_SECONDS:
                    last_rollup = time.monotonic()
                    await self.roll_up()
            except Exception:  # a busy or briefly unreachable database must not end the heartbeat
                log.exception("money heartbeat failed")

    def _heartbeat(self, conn: Connection, *, now: Any) -> None:
        money.heartbeat(conn, instance_id=self.instance_id, now=now)

    async def aclose(self) -> None:
        """Stop the heartbeat and unregister (after every request is settled: call after the ledger's
        flush)."""
        for task in (self._task, self._price_task, self._sweep_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._price_task = self._sweep_task = None
        try:
            await self._writer.run(lambda conn: money.unregister_instance(conn, instance_id=self.instance_id))
        except Exception:
            log.exception("unregistering server process %s failed", self.instance_id)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
