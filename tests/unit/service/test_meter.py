"""The meter's admission on a real store (SQLite and PostgreSQL): what a cancelled caller leaves on its
account, observed through the account and the holds table."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any, cast

import pytest
from sqlalchemy import Connection

from qwen_gateway.engines.base import ChatMessage, GenerationRequest, SamplingParams
from qwen_gateway.service.keys import KeyService
from qwen_gateway.service.ledger import LedgerWriter
from qwen_gateway.service.money.meter import Meter
from qwen_gateway.service.money.prices import Price
from qwen_gateway.service.validation import ChatCall
from qwen_gateway.store import money
from qwen_gateway.store.db import Store
from qwen_gateway.store.money import settle, settle_async, settle_sync


def _call(request_id: str) -> ChatCall:
    """What admission reads of a validated call (the rest of a ChatCall plays no part in it)."""
    generation = GenerationRequest(
        request_id=request_id,
        model="m",
        messages=(ChatMessage("user", "hi"),),
        sampling=SamplingParams(max_tokens=10),
    )
    model = SimpleNamespace(id="m", engine=SimpleNamespace(capabilities=SimpleNamespace(max_context=0)))
    return cast(
        ChatCall,
        SimpleNamespace(
            request_id=request_id,
            model=model,
            generation=generation,
            n=1,
            search_reserve=0,
            endpoint="chat.completions",
        ),
    )


def test_a_caller_cancelled_twice_while_its_hold_is_taken_still_records_the_hold(db_url: str) -> None:
    """The hold's transaction commits whatever happens to the caller; the caller's account must say so
    (its settlement gives the hold back), even when it is cancelled a second time while waiting."""

    async def main() -> tuple[Any, list[tuple[str, str, int]], int]:
        async with await Store.open(db_url) as store:
            writer = LedgerWriter(
                store,
                write=settle_async,
                write_sync=settle_sync,
                in_transaction=lambda conn, rows: settle(conn, rows=rows),
            )
            meter = Meter(writer, {"m": Price(1000, 1000)})
            key, _ = await KeyService(store).create("k", balance_micro=10**9)
            account = meter.account_for(key)
            assert account is not None
            gate = threading.Event()

            def blocked(conn: Connection) -> None:
                gate.wait(timeout=60)

            # The writer is busy with this: the admission queues behind it, in the next transaction.
            busy = asyncio.ensure_future(writer.run(blocked))
            await asyncio.sleep(0)
            admitting = asyncio.ensure_future(meter.admit(_call("req-1"), account))
            for _ in range(3):
                await asyncio.sleep(0)
            admitting.cancel()
            for _ in range(3):
                await asyncio.sleep(0)
            admitting.cancel()  # again, while the first cancellation waits for the hold's outcome
            for _ in range(3):
                await asyncio.sleep(0)
            gate.set()
            with pytest.raises(asyncio.CancelledError):
                await admitting
            await busy
            async with writer.store_connection() as conn:
                held = await conn.run_sync(lambda sync: money.open_holds(sync, key_id=key.id))
            await writer.aclose()
            return account, held, 10**9

    account, held, start = asyncio.run(main())
    assert held == [("req-1", account.key.id, account.held_micro)]
    assert account.admitted
    assert account.held_micro is not None and account.held_micro > 0
    assert account.balance_micro == start - account.held_micro
