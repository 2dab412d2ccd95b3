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
from typing import Any, Literal

from sqlalchemy import Connection, bindparam, delete, insert, select, update

from qwen_gateway.store import driver
from qwen_gateway.store.db import Database, transaction
from qwen_gateway.store.tables import api_keys, gateway_instances, holds, usage_ledger
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


# The rare statements as Core (the hot ones are driver.py's text, run through driver.Cursor).
_k = api_keys.c
_BALANCE_FOR_UPDATE = select(_k.balance_micro).where(_k.id == bindparam("p_key")).with_for_update()
_SET_BALANCE = (
    update(api_keys).where(_k.id == bindparam("p_key")).values(balance_micro=bindparam("p_balance"))
)


@dataclass(frozen=True, slots=True)
class HoldRequest:
    """One request's admission (see :func:`admit_many`). ``limited_hint``: the caller's possibly stale
    view that the key has limits; it only picks the first statement tried."""

    key_id: str
    request_id: str
    model: str
    owner: str
    now: datetime
    hold_micro: int
    tokens: int
    limited_hint: bool = False
    endpoint: str = "chat.completions"


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
    """:func:`admit_many` of one request."""
    request = HoldRequest(key_id, request_id, model, owner, now, hold_micro, tokens, limited_hint)
    return admit_many(conn, [request])[0]


def admit_many(conn: Connection, requests: Sequence[HoldRequest]) -> list[Admitted | Refused]:
    """Check each request's RPM/TPM window, then (if its key is metered) hold its ``hold_micro``, in the
    caller's transaction, in order: each request sees the ones before it. The keys' limits and balances
    are read here, fresh, not from a cache. A refusal moves no money and adds nothing to the window.

    Why many at once: the ledger writer hands over every admission that queued up meanwhile (16 clients:
    about 8 per batch), and a key's admissions then cost the statements of one (one conditional UPDATE
    of the sum, one INSERT of all the holds) instead of two per request: at 16 clients on one saturated
    core, added latency is about 16 x the CPU added per request."""
    out: list[Admitted | Refused | None] = [None] * len(requests)
    groups: dict[tuple[str, bool], list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault((request.key_id, request.limited_hint), []).append(i)
    cur = driver.Cursor(conn)
    try:
        for (key_id, hinted), indices in groups.items():
            group = [requests[i] for i in indices]
            fast = None if hinted else _hold_unlimited(cur, key_id, group)
            results = _admit_key(cur, key_id, group) if fast is None else fast
            for i, result in zip(indices, results, strict=True):
                out[i] = result
    finally:
        cur.close()
    return [r for r in out if r is not None]


def _hold_row(cur: driver.Cursor, request: HoldRequest) -> dict[str, Any]:
    return {
        "request_id": request.request_id,
        "key_id": request.key_id,
        "amount_micro": request.hold_micro,
        "model": request.model,
        "owner": request.owner,
        "created_at": cur.when(request.now),
        "endpoint": request.endpoint,
    }


def _hold_unlimited(cur: driver.Cursor, key_id: str, group: Sequence[HoldRequest]) -> list[Admitted] | None:
    """The common case in two statements: a metered key without limits that can pay for the whole
    group. None: not that case (limits, not enough for all, unknown key): the general path decides."""
    total = sum(r.hold_micro for r in group)
    at = cur.when(max(r.now for r in group))
    after = cur.one(driver.FAST_HOLD, {"key": key_id, "hold": total, "now": at})
    if after is None:
        return None
    cur.many(driver.INSERT_HOLD, [_hold_row(cur, r) for r in group])
    # Each request's balance after its own hold, as if they had been taken one by one in this order.
    balance = int(after[0]) + total
    out = []
    for request in group:
        balance -= request.hold_micro
        out.append(Admitted(balance, request.hold_micro, None))
    return out


def _admit_key(cur: driver.Cursor, key_id: str, group: Sequence[HoldRequest]) -> list[Admitted | Refused]:
    """The general path for one key's requests, in order: limits, then the balance."""
    # The first statement writes the key's row: it serialises admissions of this key across processes
    # (see the module docstring) and reads the key's limits and balance as of now (the row stays locked,
    # or the database, until the commit: the checks below decide on values nobody else can change).
    key = cur.one(driver.TOUCH, {"key": key_id, "now": cur.when(max(r.now for r in group))})
    if key is None:
        return [Refused("unknown", None) for _ in group]
    rpm_limit, tpm_limit, balance = key
    limited = rpm_limit is not None or tpm_limit is not None
    balance = None if balance is None else int(balance)
    out: list[Admitted | Refused] = []
    holds_taken: list[HoldRequest] = []
    # The window as read for ``window_second`` plus what this group added to it since (per second).
    window_second: int | None = None
    count = used = 0
    oldest: int | None = None
    added: dict[int, list[int]] = {}
    for request in group:
        second = int(request.now.timestamp())
        if limited:
            if second != window_second:
                _count_window(cur, key_id, added)
                added = {}
                count, used, oldest = _read_window(cur, key_id, second)
                window_second = second
            # When the oldest second of the window leaves it (at least 1 s).
            first = second if oldest is None else oldest
            retry = max(1, first + WINDOW_SECONDS - second)
            if rpm_limit is not None and count >= rpm_limit:
                out.append(Refused("rpm", balance, retry))
                continue
            # A lone request is let through whatever its estimate: a limit below one request's
            # estimate must not lock the key out for good.
            if tpm_limit is not None and count > 0 and used + request.tokens > tpm_limit:
                out.append(Refused("tpm", balance, retry))
                continue
        held: int | None = None
        if balance is not None:
            if balance < request.hold_micro:
                out.append(Refused("balance", balance))
                continue
            balance -= request.hold_micro
            held = request.hold_micro
            holds_taken.append(request)
        if not limited:
            out.append(Admitted(balance, held, None))
            continue
        count += 1
        used += request.tokens
        oldest = second if oldest is None else oldest
        bucket = added.setdefault(second, [0, 0])
        bucket[0] += 1
        bucket[1] += request.tokens
        out.append(Admitted(balance, held, second))
    if holds_taken:
        total = sum(r.hold_micro for r in holds_taken)
        # Conditional still: the balance was read above in this transaction, so this can't fail, but
        # money never moves on a check made in Python alone.
        if cur.one(driver.TAKE, {"key": key_id, "hold": total}) is None:
            raise RuntimeError(f"key {key_id}'s balance changed under its row lock")
        cur.many(driver.INSERT_HOLD, [_hold_row(cur, r) for r in holds_taken])
    if limited:
        _count_window(cur, key_id, added)
    return out


def _read_window(cur: driver.Cursor, key_id: str, second: int) -> tuple[int, int, int | None]:
    count, used, oldest = cur.one(driver.WINDOW_READ, {"key": key_id, "oldest": second - WINDOW_SECONDS})
    return int(count), int(used), None if oldest is None else int(oldest)


def _count_window(cur: driver.Cursor, key_id: str, added: dict[int, list[int]]) -> None:
    for second, (requests, tokens) in added.items():
        bucket = {"key": key_id, "second": second, "requests": requests, "tokens": tokens}
        if cur.run(driver.WINDOW_COUNT, bucket) == 0:
            # A new second: the seconds that left the window go (the read above skips them meanwhile),
            # so a key keeps at most 61 rows, deleted at most once a second.
            cur.run(driver.WINDOW_EXPIRE, {"key": key_id, "oldest": second - WINDOW_SECONDS})
            cur.run(driver.WINDOW_INSERT, bucket)


def settle(conn: Connection, *, rows: Sequence[NewUsage]) -> list[int | None]:
    """Write ``rows`` to the ledger and, for each held one, release its hold and charge its cost, in the
    caller's transaction. Returns each row's key balance after settling (None: no money moved).

    Rows of one key are charged with one statement (their holds released with one), as
    :func:`admit_many` takes them; each row's balance is the one it would have had settled alone in
    this order."""
    if not rows:
        return []
    cur = driver.Cursor(conn)
    try:
        return _settle(conn, cur, rows)
    finally:
        cur.close()


def _settle(conn: Connection, cur: driver.Cursor, rows: Sequence[NewUsage]) -> list[int | None]:
    # First, so that a request settled already (unique request id) fails before any money moves.
    ledger = []
    for row in rows:
        values = row.values()
        values["created_at"] = cur.when(values["created_at"])
        ledger.append(values)
    cur.many(driver.INSERT_LEDGER, ledger)
    # The estimates counted at admission become the real counts (a bucket already out of the window is
    # gone: nothing to correct).
    deltas: dict[tuple[str, int], int] = {}
    for row in rows:
        if row.rate_second is not None and row.key_id is not None:
            real = row.prompt_tokens + row.completion_tokens
            where = (row.key_id, row.rate_second)
            deltas[where] = deltas.get(where, 0) + real - row.rate_tokens
    cur.many(
        driver.WINDOW_CORRECT,
        [{"key": k, "second": s, "delta": d} for (k, s), d in deltas.items() if d != 0],
    )
    out: list[int | None] = [None] * len(rows)
    held = [i for i, row in enumerate(rows) if row.held_micro is not None and row.key_id is not None]
    if not held:
        return out
    # No hold left: a release (its process looked dead, or the hold outlived the bound) gave it back
    # already; the cost is then charged from the balance alone.
    released: dict[str, int] = {}
    for start in range(0, len(held), driver.RELEASE_CHUNK):
        ids = [rows[i].request_id for i in held[start : start + driver.RELEASE_CHUNK]]
        params = {f"r{j}": request_id for j, request_id in enumerate(ids)}
        for request_id, amount in cur.all(driver.release_many(len(ids)), params):
            released[request_id] = int(amount)
    by_key: dict[str, list[int]] = {}
    for i in held:
        key_id = rows[i].key_id
        assert key_id is not None
        by_key.setdefault(key_id, []).append(i)
    for key_id, indices in by_key.items():
        gives = [released.get(rows[i].request_id, 0) for i in indices]
        costs = [rows[i].cost_micro or 0 for i in indices]
        running, low = 0, 0
        for give, cost in zip(gives, costs, strict=True):
            running += give - cost
            low = min(low, running)
        charged = cur.one(driver.CHARGE_MANY, {"key": key_id, "delta": running, "low": low})
        if charged is not None:
            # Each row's balance after its own charge, as if charged one by one in this order.
            balance = int(charged[0]) - running
            for i, give, cost in zip(indices, gives, costs, strict=True):
                balance += give - cost
                out[i] = balance
            continue
        # Rare: one of them costs more than is held and left when its turn comes. One by one, so the
        # rows that fit are charged in full and one that does not takes what is left.
        for i, give, cost in zip(indices, gives, costs, strict=True):
            after = cur.one(driver.CHARGE, {"key": key_id, "released": give, "cost": cost})
            out[i] = int(after[0]) if after is not None else _charge_what_is_left(conn, rows[i], give)
    return out


def _charge_what_is_left(conn: Connection, row: NewUsage, released: int) -> int:
    """The cost is above what is held and left (a hold can't be too small with the byte bound, but
    settlement must not trust it): charge what there is; the ledger row says so. Returns 0."""
    balance = int(conn.execute(_BALANCE_FOR_UPDATE, {"p_key": row.key_id}).scalar() or 0)
    log.warning(
        "request %s cost %d µCNY, more than its hold and key %s's balance: charged %d",
        row.request_id,
        row.cost_micro or 0,
        row.key_id,
        balance + released,
    )
    conn.execute(_SET_BALANCE, {"p_key": row.key_id, "p_balance": 0})
    conn.execute(
        update(usage_ledger)
        .where(usage_ledger.c.request_id == row.request_id)
        .values(cost_micro=balance + released)
    )
    return 0


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
                        # Holds taken before migration 0008 don't say.
                        endpoint=hold.endpoint or "chat.completions",
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
