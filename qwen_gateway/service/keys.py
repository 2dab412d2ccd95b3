"""API keys: make them, check them, list and revoke them.

A key is ``sk-`` + 32 hex digits (128 random bits). It is shown once, at creation; the database keeps
only its SHA-256. A slow password hash (bcrypt, argon2) protects low-entropy secrets against offline
guessing; a 128-bit random key can't be guessed however fast the hash is, so a fast unsalted hash is as
safe and lets the server find a key by an indexed equality lookup on every request (the approach of
GitHub's and Stripe's token stores).
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

from qwen_gateway.errors import AuthenticationError, GatewayError
from qwen_gateway.store.db import Store
from qwen_gateway.store.keys import (
    DuplicateKeyName,
    KeyRow,
    find_active_key_by_hash,
    get_key,
    insert_key,
    list_keys,
    revoke_key,
    set_limits,
    top_up,
)

KEY_PREFIX = "sk-"
PREFIX_SHOWN = 8  # characters kept in clear for display: "sk-" + 5 hex
NAME_MAX = 100
# Anything longer is not one of our keys; refuse before hashing attacker-sized input.
RAW_KEY_MAX = 256
_ID_LIKE = re.compile(r"key_[0-9a-f]{12}")


class KeyNameTaken(GatewayError):
    """Another key already has this name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"an API key named {name!r} already exists")
        self.name = name


class InvalidKeyName(GatewayError):
    """The name can't be used for a key."""


class InvalidKeySetting(GatewayError):
    """A balance, top-up or limit that can't be set."""


def hash_key(raw_key: str) -> str:
    """Hex SHA-256 of the whole key (see the module docstring for why a fast hash is right)."""
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_hex(16)


class KeyService:
    """Key management over a :class:`Store`.

    ``authenticate`` keeps successful lookups in a small in-memory cache for ``cache_ttl`` seconds
    (default 5; 0 disables it) so the hot path doesn't query SQL on every request. Revoking through this
    service evicts the key at once; a revocation made elsewhere (the CLI, another server process) takes
    effect here within ``cache_ttl`` seconds. Unknown keys are never cached, so a key created by the CLI
    works immediately. The cached :class:`KeyRow` may be up to ``cache_ttl`` old: read balances from
    the store, not from it.

    Concurrent misses for one key share a single lookup (single flight): a burst of requests with a
    key not (or no longer) cached — 40 clients at once when its entry has just expired — costs one SQL
    query, not one each (measured: those lookups were a quarter of the server's CPU while refusing an
    overload burst).
    """

    def __init__(
        self,
        store: Store,
        *,
        cache_ttl: float = 5.0,
        cache_size: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ttl = cache_ttl
        self._size = cache_size
        self._clock = clock
        # key hash -> (row, monotonic expiry); insertion order doubles as LRU order.
        self._cache: OrderedDict[str, tuple[KeyRow, float]] = OrderedDict()
        # key hash -> the lookup in progress, shared by every request that missed the cache meanwhile.
        self._inflight: dict[str, asyncio.Task[KeyRow | None]] = {}
        # Bumped by every change made here (revoke, top-up, limits): a lookup that started before a
        # change does not put its (possibly outdated) row into the cache.
        self._generation = 0

    async def create(
        self,
        name: str,
        *,
        balance_micro: int | None = None,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
    ) -> tuple[KeyRow, str]:
        """Create a key named ``name``; returns its row and the key itself, which is not stored.

        With ``balance_micro`` the key is metered (requests are held and charged against it); limits
        are requests / tokens per minute (None: none)."""
        name = _check_name(name)
        if balance_micro is not None and balance_micro < 0:
            raise InvalidKeySetting("a balance can't be negative")
        for what, limit in (("rpm", rpm_limit), ("tpm", tpm_limit)):
            if limit is not None and limit < 1:
                raise InvalidKeySetting(f"--{what} must be at least 1")
        raw_key = generate_key()
        try:
            row = await insert_key(
                store=self._store,
                name=name,
                prefix=raw_key[:PREFIX_SHOWN],
                key_hash=hash_key(raw_key),
                balance_micro=balance_micro,
                rpm_limit=rpm_limit,
                tpm_limit=tpm_limit,
            )
        except DuplicateKeyName:
            raise KeyNameTaken(name) from None
        return row, raw_key

    async def authenticate(self, raw_key: str | None) -> KeyRow:
        """The active key for ``raw_key``; :class:`AuthenticationError` if missing, unknown or revoked."""
        if not raw_key or len(raw_key) > RAW_KEY_MAX:
            raise AuthenticationError()
        digest = hash_key(raw_key)
        row = self._cached(digest)
        if row is None:
            row = await self._lookup(digest)
            if row is None:
                raise AuthenticationError()
        # The lookup already matched on the hash; compare again in constant time so that accepting a key
        # never depends on a variable-time string comparison, wherever the row came from.
        if not hmac.compare_digest(row.key_hash, digest):
            raise AuthenticationError()
        return row

    async def get(self, name_or_id: str) -> KeyRow | None:
        """The key (revoked or not) with this id or name."""
        return await get_key(store=self._store, name_or_id=name_or_id)

    async def list(self, *, include_revoked: bool = True) -> builtins.list[KeyRow]:
        """All keys, oldest first."""
        return await list_keys(store=self._store, include_revoked=include_revoked)

    async def revoke(self, name_or_id: str) -> KeyRow | None:
        """Revoke the key with this id or name; None if there is none. Revoking twice is harmless."""
        row = await revoke_key(store=self._store, name_or_id=name_or_id)
        if row is not None:
            self._forget(row.key_hash)
        return row

    async def top_up(self, name_or_id: str, amount_micro: int) -> KeyRow | None:
        """Add to the key's balance (an unmetered key becomes metered); None if there is no such key."""
        if amount_micro <= 0:
            raise InvalidKeySetting("a top-up must be positive")
        row = await get_key(store=self._store, name_or_id=name_or_id)
        if row is None:
            return None
        changed = await top_up(store=self._store, key_id=row.id, amount_micro=amount_micro)
        if changed is not None:
            self._forget(changed.key_hash)
        return changed

    async def set_limits(self, name_or_id: str, **limits: int | None) -> KeyRow | None:
        """Set (int >= 1) or clear (None) ``rpm_limit``/``tpm_limit``; None if there is no such key."""
        for what, limit in limits.items():
            if limit is not None and limit < 1:
                raise InvalidKeySetting(f"{what} must be at least 1")
        row = await get_key(store=self._store, name_or_id=name_or_id)
        if row is None:
            return None
        changed = await set_limits(store=self._store, key_id=row.id, **limits)
        if changed is not None:
            self._forget(changed.key_hash)
        return changed

    async def _lookup(self, digest: str) -> KeyRow | None:
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.ensure_future(self._find(digest, self._generation))
            self._inflight[digest] = task
            task.add_done_callback(lambda _: self._inflight.pop(digest, None))
        # Shielded: a waiter that goes away (client hung up) does not cancel the others' lookup.
        return await asyncio.shield(task)

    async def _find(self, digest: str, generation: int) -> KeyRow | None:
        row = await find_active_key_by_hash(store=self._store, key_hash=digest)
        if row is not None and generation == self._generation:
            self._remember(digest, row)
        return row

    def _forget(self, digest: str) -> None:
        self._generation += 1
        self._cache.pop(digest, None)

    def _cached(self, digest: str) -> KeyRow | None:
        entry = self._cache.get(digest)
        if entry is None:
            return None
        row, expires = entry
        if self._clock() >= expires:
            del self._cache[digest]
            return None
        self._cache.move_to_end(digest)
        return row

    def _remember(self, digest: str, row: KeyRow) -> None:
        if self._ttl <= 0 or self._size <= 0:
            return
        self._cache[digest] = (row, self._clock() + self._ttl)
        self._cache.move_to_end(digest)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)


def _check_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise InvalidKeyName("a key name can't be empty")
    if len(name) > NAME_MAX:
        raise InvalidKeyName(f"a key name can have at most {NAME_MAX} characters")
    if not name.isprintable():
        raise InvalidKeyName("a key name can't contain control characters")
    # `keys revoke KEY` accepts a name or an id: a name shaped like an id would make that ambiguous.
    if _ID_LIKE.fullmatch(name):
        raise InvalidKeyName(f"{name!r} looks like a key id; choose another name")
    return name
