"""In-process store: a dict. For one process, unit tests and demos.

It follows the `Store` contract (`mvalve_async.interfaces.Store`) with nothing to
wait for: every call completes at once, without suspending, so `update` is atomic
within the event loop. A `deadline` that has already passed raises `StoreError`
before anything is read or written, as with memcached. Lifetimes are kept exactly
(`ttl` seconds on the monotonic clock), with no upper bound (`max_ttl` is infinite).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from mvalve_async.errors import ConfigError, StoreError
from mvalve_async.interfaces import StoreHealth

__all__ = ["MemoryStore"]

R = TypeVar("R")


def _check_ttl(ttl: float) -> float:
    if ttl < 0 or math.isnan(ttl):
        raise ConfigError(f"ttl must be >= 0 seconds, got {ttl!r}")
    return ttl


def _check_deadline(deadline: float | None, what: str) -> None:
    if deadline is not None and deadline <= asyncio.get_running_loop().time():
        raise StoreError(f"memory store: {what} not run: the caller's deadline had passed")


class MemoryStore:
    """`Store` in a dict. `ops` counts calls that read or write records (a
    `get_many` of any number of keys is one); `health` costs none."""

    name = "memory"
    max_ttl = math.inf
    may_lose_records = False  # they live as long as the process

    def __init__(self) -> None:
        self.ops = 0
        self._data: dict[str, tuple[bytes, float]] = {}  # key -> (value, expires or 0)
        self._born = time.monotonic()
        self._started = time.time()

    def _live(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires and expires <= time.monotonic():
            del self._data[key]
            return None
        return value

    async def get(self, key: str, *, deadline: float | None = None) -> bytes | None:
        _check_deadline(deadline, "get")
        self.ops += 1
        return self._live(key)

    async def get_many(
        self, keys: Iterable[str], *, deadline: float | None = None
    ) -> dict[str, bytes]:
        wanted = dict.fromkeys(keys)
        _check_deadline(deadline, "get_many")
        if not wanted:
            return {}
        self.ops += 1
        found: dict[str, bytes] = {}
        for key in wanted:
            value = self._live(key)
            if value is not None:
                found[key] = value
        return found

    async def update(
        self,
        key: str,
        fn: Callable[[bytes | None], tuple[bytes | None, R]],
        ttl: float | Callable[[bytes], float] = 0,
        *,
        deadline: float | None = None,
    ) -> R:
        if not callable(ttl):
            _check_ttl(ttl)
        _check_deadline(deadline, "update")
        # No await between read and write: atomic within the event loop.
        self.ops += 1
        new, result = fn(self._live(key))
        if new is not None:
            if not isinstance(new, bytes):
                raise TypeError(f"update fn must return bytes or None, got {type(new).__name__}")
            seconds = _check_ttl(ttl(new)) if callable(ttl) else ttl
            self._data[key] = (new, time.monotonic() + seconds if seconds else 0.0)
        return result

    async def delete(self, key: str, *, deadline: float | None = None) -> None:
        _check_deadline(deadline, "delete")
        self.ops += 1
        self._data.pop(key, None)

    async def health(
        self, key: str, *, since: float | None = None, deadline: float | None = None
    ) -> StoreHealth:
        """Always the same incarnation, never an eviction: records live until they
        expire or are deleted. `uptime` counts from the store's creation; every
        reading is fresh (`since` is always met)."""
        _check_deadline(deadline, "health")
        return StoreHealth(
            server="memory",
            uptime=time.monotonic() - self._born,
            evictions=0,
            started=self._started,
            pid=os.getpid(),
        )

    async def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"MemoryStore(keys={len(self._data)})"
