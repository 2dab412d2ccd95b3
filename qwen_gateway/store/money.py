"""The money SQL: admission (rate window + hold), settlement (with the ledger row), release of dead
processes' holds. Portable SQLAlchemy Core: the same statements run on SQLite and PostgreSQL (the
hottest ones on the ledger writer's own connection go to the driver's cursor, see store/driver.py).

Every function takes a synchronous :class:`Connection` already inside a transaction, so it runs either
on the ledger writer's own connection in its worker thread (SQLite, one thread hop per transaction) or
through ``AsyncConnection.run_sync`` (any backend). Invariants, each kept inside one transaction:

- ``balance + open holds + ledger costs`` of a key changes only by top-ups: a hold moves money from the
  balance to ``holds``; settlement moves it from ``holds`` to the ledger row (and gives back the rest);
  a release moves it back to the balance.
- A balance never goes below zero: a hold is one conditional ``UPDATE ... WHERE balance >= hold``; a
  settlement charges at most what is held plus what is left.
- A request is settled at most once: its ledger row's ``request_id`` is unique, so a second settlement
  fails as a whole and moves nothing.
- Rate checks can't be passed by two processes at once: a limited key's admission starts by writing
  its key row (SQLite: the database's write lock; PostgreSQL: the row's lock) before reading its window.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update

from qwen_gateway.store import driver
from qwen_gateway.store.db import Database, transaction
from qwen_gateway.store.tables import api_keys, gateway_instances, holds, rate_windows, usage_ledger
from qwen_gateway.store.usage import NewUsage

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60


@dataclass(frozen=True, slots=True)
class Admitted:
    """The request may run. ``balance_micro``: the key's balance after its hold, ``held_micro`` the hold
    (both None: the key is unmetered); ``rate_second``: the bucket of the key's rate window it was
    counted in (None: the key has no limits)."""

    balance_micro: int | None
    held_micro: int | None
    rate_second: int | None


@dataclass(frozen=True, slots=True)
class Refused:
    """``reason``: "rpm" / "tpm" (429) or "balance" (400 Arrearage). ``retry_after`` in seconds."""

    reason: Literal["rpm", "tpm", "balance", "unknown"]
    balance_micro: int | None
    retry_after: int | None = None


# Statements are built once (bind parameters named apart from the columns) and executed with
# parameters: building and cache-keying a Core statement per call cost more CPU than running it.
_k = api_keys.c
_w = rate_windows.c
_FAST_HOLD = (
    update(api_keys)
    .where(
        _k.id == bindparam("p_key"),
        _k.balance_micro >= bindparam("p_hold"),
        _k.rpm_limit.is_(None),
        _k.tpm_limit.is_(None),
    )
    .values(balance_micro=_k.balance_micro - bindparam("p_hold"), last_used_at=bindparam("p_now"))
    .returning(_k.balance_micro)
)
_TOUCH = (
    update(api_keys)
    .where(_k.id == bindparam("p_key"))
    .values(last_used_at=bindparam("p_now"))
    .returning(_k.rpm_limit, _k.tpm_limit, _k.balance_micro)
)
_HOLD = (
    update(api_keys)
    .where(_k.id == bindparam("p_key"), _k.balance_micro >= bindparam("p_hold"))
    .values(balance_micro=_k.balance_micro - bindparam("p_hold"))
    .returning(_k.balance_micro)
)
_INSERT_HOLD = insert(holds)
_WINDOW_EXPIRE = delete(rate_windows).where(
    _w.key_id == bindparam("p_key"), _w.second <= bindparam("p_oldest")
)
_WINDOW_READ = select(
    func.coalesce(func.sum(_w.requests), 0), func.coalesce(func.sum(_w.tokens), 0), func.min(_w.second)
).where(_w.key_id == bindparam("p_key"), _w.second > bindparam("p_oldest"))
_WINDOW_COUNT = (
    update(rate_windows)
    .where(_w.key_id == bindparam("p_key"), _w.second == bindparam("p_second"))
    .values(requests=_w.requests + 1, tokens=_w.tokens + bindparam("p_tokens"))
)
_WINDOW_INSERT = insert(rate_windows)
_WINDOW_CORRECT = (
    update(rate_windows)
    .where(_w.key_id == bindparam("p_key"), _w.second == bindparam("p_second"))
    .values(tokens=_w.tokens + bindparam("p_delta"))
)
_RELEASE = delete(holds).where(holds.c.request_id == bindparam("p_request")).returning(holds.c.amount_micro)
_CHARGE = (
    update(api_keys)
    .where(_k.id == bindparam("p_key"), _k.balance_micro + bindparam("p_released") >= bindparam("p_cost"))
    .values(balance_micro=_k.balance_micro + bindparam("p_released") - bindparam("p_cost"))
    .returning(_k.balance_micro)
)
_BALANCE_FOR_UPDATE = select(_k.balance_micro).where(_k.id == bindparam("p_key")).with_for_update()
_SET_BALANCE = (
    update(api_keys).where(_k.id == bindparam("p_key")).values(balance_micro=bindparam("p_balance"))
)
_LEDGER_INSERT = usage_ledger.insert()


def admit(
    conn: Connection,
    *,
    key_id: str,
    request_id: str,
    model: str,
    owner: str,
    now: datetime,
    hold_micro: int,
    tokens: int,
    limited_hint: bool = False,
) -> Admitted | Refused:
    """Check the key's RPM/TPM window, then (if the key is metered) hold ``hold_micro``, in the caller's
    transaction. The key's limits and balance are read here, fresh, not from a cache (``limited_hint``,
    the caller's possibly stale view that the key has limits, only skips a statement that would find
    nothing). A refusal moves no money and adds nothing to the window."""
    hold_row = {
        "request_id": request_id,
        "key_id": key_id,
        "amount_micro": hold_micro,
        "model": model,
        "owner": owner,
        "created_at": now,
    }
    # The common case in one statement: a metered key without limits that can pay.
    if not limited_hint:
        if driver.supported(conn):
            # The same two statements on the driver's cursor (store/driver.py says why).
            at = driver.when(conn, now)
            after = driver.one(conn, driver.FAST_HOLD, {"key": key_id, "hold": hold_micro, "now": at})
            if after is not None:
                driver.run(conn, driver.INSERT_HOLD, {**hold_row, "created_at": at})
                return Admitted(int(after), hold_micro, None)
        else:
            fast = conn.execute(_FAST_HOLD, {"p_key": key_id, "p_hold": hold_micro, "p_now": now}).first()
            if fast is not None:
                conn.execute(_INSERT_HOLD, hold_row)
                return Admitted(int(fast[0]), hold_micro, None)
    second = int(now.timestamp())
    # The first statement writes the key's row: it serialises admissions of this key across processes
    # (see the module docstring) and reads the key's limits and balance as of now.
    key = conn.execute(_TOUCH, {"p_key": key_id, "p_now": now}).first()
    if key is None:
        return Refused("unknown", None)
    rpm_limit, tpm_limit, balance = key
    limited = rpm_limit is not None or tpm_limit is not None
    if limited:
        window = {"p_key": key_id, "p_oldest": second - WINDOW_SECONDS}
        count, used, oldest = conn.execute(_WINDOW_READ, window).one()
        count, used = int(count), int(used)
        # When the oldest second of the window leaves it (at least 1 s).
        retry = 1 if oldest is None else max(1, int(oldest) + WINDOW_SECONDS - second)
        if rpm_limit is not None and count >= rpm_limit:
            return Refused("rpm", balance, retry)
        # A lone request is let through whatever its estimate: a limit below one request's estimate
        # must not lock the key out for good.
        if tpm_limit is not None and count > 0 and used + tokens > tpm_limit:
            return Refused("tpm", balance, retry)
    held: int | None = None
    if balance is not None:
        after = conn.execute(_HOLD, {"p_key": key_id, "p_hold": hold_micro}).first()
        if after is None:
            return Refused("balance", int(balance))
        balance, held = int(after[0]), hold_micro
        conn.execute(_INSERT_HOLD, hold_row)
    if not limited:
        return Admitted(balance, held, None)
    bucket = {"p_key": key_id, "p_second": second, "p_tokens": tokens}
    if conn.execute(_WINDOW_COUNT, bucket).rowcount == 0:
        # A new second: the seconds that left the window go (the read above skips them meanwhile), so
        # a key keeps at most 61 rows, deleted at most once a second.
        conn.execute(_WINDOW_EXPIRE, {"p_key": key_id, "p_oldest": second - WINDOW_SECONDS})
        conn.execute(_WINDOW_INSERT, {"key_id": key_id, "second": second, "requests": 1, "tokens": tokens})
    return Admitted(balance, held, second)


def settle(conn: Connection, *, rows: Sequence[NewUsage]) -> list[int | None]:
    """Write ``rows`` to the ledger and, for each held one, release its hold and charge its cost, in the
    caller's transaction. Returns each row's key balance after settling (None: no money moved)."""
    if not rows:
        return []
    # First, so that a request settled already (unique request id) fails before any money moves.
    raw = driver.supported(conn)
    if raw:
        driver.run_many(
            conn, driver.INSERT_LEDGER, [driver.ledger_params(conn, row.values()) for row in rows]
        )
    else:
        conn.execute(_LEDGER_INSERT, [row.values() for row in rows])
    out: list[int | None] = []
    for row in rows:
        if row.rate_second is not None and row.key_id is not None:
            # The estimate counted at admission becomes the real count (a bucket already out of the
            # window is gone: nothing to correct).
            real = row.prompt_tokens + row.completion_tokens
            conn.execute(
                _WINDOW_CORRECT,
                {"p_key": row.key_id, "p_second": row.rate_second, "p_delta": real - row.rate_tokens},
            )
        if row.held_micro is None or row.key_id is None:
            out.append(None)
            continue
        # No hold left: a release (its process looked dead, or the hold outlived the bound) gave it back
        # already; the cost is then charged from the balance alone.
        cost = row.cost_micro or 0
        if raw:
            released = int(driver.one(conn, driver.RELEASE, {"request": row.request_id}) or 0)
            charged = driver.one(conn, driver.CHARGE, {"key": row.key_id, "released": released, "cost": cost})
        else:
            released = int(conn.execute(_RELEASE, {"p_request": row.request_id}).scalar() or 0)
            charged = conn.execute(
                _CHARGE, {"p_key": row.key_id, "p_released": released, "p_cost": cost}
            ).scalar()
        if charged is not None:
            out.append(int(charged))
            continue
        # Rare: the cost is above what is held and left (a hold can't be too small with the byte bound,
        # but settlement must not trust it). Charge what there is; the ledger row says so.
        balance = int(conn.execute(_BALANCE_FOR_UPDATE, {"p_key": row.key_id}).scalar() or 0)
        log.warning(
            "request %s cost %d µCNY, more than its hold and key %s's balance: charged %d",
            row.request_id,
            cost,
            row.key_id,
            balance + released,
        )
        conn.execute(_SET_BALANCE, {"p_key": row.key_id, "p_balance": 0})
        conn.execute(
            update(usage_ledger)
            .where(usage_ledger.c.request_id == row.request_id)
            .values(cost_micro=balance + released)
        )
        out.append(0)
    return out


def settle_sync(*, conn: Connection, rows: Sequence[NewUsage]) -> list[int | None]:
    """:func:`settle` in a transaction of its own (the ledger writer's ``write_sync``)."""
    with conn.begin():
        return settle(conn, rows=rows)


async def settle_async(*, store: Database, rows: Sequence[NewUsage]) -> list[int | None]:
    """:func:`settle` in a transaction of its own on the async store (the ledger writer's ``write``)."""
    async with transaction(store) as conn:
        return await conn.run_sync(lambda sync: settle(sync, rows=rows))


def _balance(conn: Connection, key_id: str) -> int | None:
    value = conn.execute(select(api_keys.c.balance_micro).where(api_keys.c.id == key_id)).scalar()
    return None if value is None else int(value)


def key_balance(conn: Connection, *, key_id: str) -> int | None:
    """The key's balance now (None: unmetered or unknown)."""
    return _balance(conn, key_id)


# -- server processes and the holds they leave behind ------------------------------------------------


def register_instance(conn: Connection, *, instance_id: str, hostname: str, pid: int, now: datetime) -> None:
    conn.execute(
        insert(gateway_instances).values(
            id=instance_id, hostname=hostname, pid=pid, started_at=now, heartbeat_at=now
        )
    )


def heartbeat(conn: Connection, *, instance_id: str, now: datetime) -> None:
    conn.execute(
        update(gateway_instances).where(gateway_instances.c.id == instance_id).values(heartbeat_at=now)
    )


def unregister_instance(conn: Connection, *, instance_id: str) -> None:
    conn.execute(delete(gateway_instances).where(gateway_instances.c.id == instance_id))


@dataclass(frozen=True, slots=True)
class Released:
    request_id: str
    key_id: str
    amount_micro: int
    dead_owner: bool


def release_stale_holds(
    conn: Connection,
    *,
    me: str,
    hostname: str,
    pid_alive: Callable[[int], bool],
    now: datetime,
    stale_after: timedelta,
    max_age: timedelta,
) -> list[Released]:
    """Give back the holds no live process will settle, in the caller's transaction.

    A hold's owner is dead when it is a process of this host whose pid is gone, or when its heartbeat
    is older than ``stale_after`` (another host, or a pid reused). Its request is written to the ledger
    as "expired" (no tokens, charged nothing: what it generated is unknown). Any hold older than
    ``max_age`` is given back too, whoever owns it, without a ledger row (should its request still end,
    its settlement charges the balance directly). Dead processes' rows are removed.
    """
    instances = conn.execute(select(gateway_instances)).all()
    dead = {
        i.id
        for i in instances
        if i.id != me
        and ((i.hostname == hostname and not pid_alive(i.pid)) or i.heartbeat_at < now - stale_after)
    }
    known = {i.id for i in instances}
    candidates = conn.execute(select(holds)).all()
    out: list[Released] = []
    for hold in candidates:
        # An owner with no instance row at all is a process that never registered or was removed: dead.
        owner_dead = hold.owner in dead or (hold.owner not in known and hold.owner != me)
        if not owner_dead and hold.created_at >= now - max_age:
            continue
        gone = conn.execute(delete(holds).where(holds.c.request_id == hold.request_id)).rowcount
        if gone != 1:
            continue
        conn.execute(
            update(api_keys)
            .where(api_keys.c.id == hold.key_id)
            .values(balance_micro=api_keys.c.balance_micro + hold.amount_micro)
        )
        if owner_dead:
            conn.execute(
                usage_ledger.insert().values(
                    NewUsage(
                        request_id=hold.request_id,
                        key_id=hold.key_id,
                        model=hold.model,
                        endpoint="chat.completions",
                        prompt_tokens=0,
                        completion_tokens=0,
                        status="expired",
                        cost_micro=0,
                        created_at=now,
                    ).values()
                )
            )
        out.append(Released(hold.request_id, hold.key_id, int(hold.amount_micro), owner_dead))
    for instance_id in dead:
        conn.execute(delete(gateway_instances).where(gateway_instances.c.id == instance_id))
    return out


def open_holds(conn: Connection, *, key_id: str | None = None) -> list[tuple[str, str, int]]:
    """(request id, key id, amount) of every open hold, optionally of one key."""
    query = select(holds.c.request_id, holds.c.key_id, holds.c.amount_micro)
    if key_id is not None:
        query = query.where(holds.c.key_id == key_id)
    return [(r[0], r[1], int(r[2])) for r in conn.execute(query).all()]


def utcnow() -> datetime:
    return datetime.now(UTC)
