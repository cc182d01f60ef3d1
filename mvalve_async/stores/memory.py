"""In-process store: a dict. For one process, unit tests and demos.

Every call completes at once, without suspending, so `update` is atomic within the
event loop. Lifetimes are kept exactly (`ttl` seconds on the monotonic clock), with
no upper bound (`max_ttl` is infinite).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from mvalve_async.errors import ConfigError

__all__ = ["MemoryStore"]

R = TypeVar("R")


class MemoryStore:
    """`Store` in a dict. `ops` counts calls that read or write records (a
    `get_many` of any number of keys is one)."""

    name = "memory"
    max_ttl = math.inf

    def __init__(self) -> None:
        self.ops = 0
        self._data: dict[str, tuple[bytes, float]] = {}  # key -> (value, expires or 0)

    def _live(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires and expires <= time.monotonic():
            del self._data[key]
            return None
        return value

    async def get(self, key: str) -> bytes | None:
        self.ops += 1
        return self._live(key)

    async def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        wanted = dict.fromkeys(keys)
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
        self, key: str, fn: Callable[[bytes | None], tuple[bytes | None, R]], ttl: float = 0
    ) -> R:
        if ttl < 0 or math.isnan(ttl):
            raise ConfigError(f"ttl must be >= 0 seconds, got {ttl!r}")
        # No await between read and write: atomic within the event loop.
        self.ops += 1
        new, result = fn(self._live(key))
        if new is not None:
            if not isinstance(new, bytes):
                raise TypeError(f"update fn must return bytes or None, got {type(new).__name__}")
            self._data[key] = (new, time.monotonic() + ttl if ttl else 0.0)
        return result

    async def delete(self, key: str) -> None:
        self.ops += 1
        self._data.pop(key, None)

    async def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"MemoryStore(keys={len(self._data)})"
