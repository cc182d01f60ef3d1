"""In-process store: a dict and a lock. For one process, unit tests and demos."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["MemoryStore"]

R = TypeVar("R")


class MemoryStore:
    name = "memory"

    def __init__(self) -> None:
        self.ops = 0
        self._data: dict[str, tuple[bytes, float]] = {}  # key -> (value, expires or 0)

    def _live(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires and expires <= time.time():
            del self._data[key]
            return None
        return value

    async def get(self, key: str) -> bytes | None:
        self.ops += 1
        return self._live(key)

    async def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        self.ops += 1
        found = {key: self._live(key) for key in keys}
        return {key: value for key, value in found.items() if value is not None}

    async def update(
        self,
        key: str,
        fn: Callable[[bytes | None], tuple[bytes | None, R]],
        ttl: float | Callable[[bytes], float] = 0,
    ) -> R:
        # No await between read and write: atomic within the event loop.
        self.ops += 1
        new, result = fn(self._live(key))
        if new is not None:
            seconds = ttl(new) if callable(ttl) else ttl
            self._data[key] = (new, time.time() + seconds if seconds else 0.0)
        return result

    async def delete(self, key: str) -> None:
        self.ops += 1
        self._data.pop(key, None)

    async def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"MemoryStore(keys={len(self._data)})"
