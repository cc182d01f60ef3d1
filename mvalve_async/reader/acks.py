"""A reader's acks: messages settled as done whose rows are not deleted yet.

They ride in the next claim's transaction (`Queue.claim(acks=...)`), so they cost
no commit of their own, or go out in one batch when `batch` have gathered, when
the reader goes idle, or a quarter of the lease after the first: never later, so
an acked row cannot come back to another reader. Where every unsettled lease holds
a connection (q4m: `QueueTraits.leases_hold_connections`) they go out at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..events import Emitter
from ..interfaces import Lease, Queue

__all__ = ["Acks"]

R = TypeVar("R")


class Acks:
    def __init__(self, queue: Queue, emit: Emitter, lease: float, batch: int) -> None:
        self.queue = queue
        self.lease = lease
        self.batch = batch
        self._emit = emit
        self._items: list[Lease] = []
        self._since = 0.0
        self.eager = queue.traits.leases_hold_connections

    def __len__(self) -> int:
        return len(self._items)

    def add(self, lease: Lease, now: float) -> None:
        if not self._items:
            self._since = now
        self._items.append(lease)

    def due(self, now: float) -> bool:
        """Send them now rather than with the next claim?"""
        if not self._items:
            return False
        return self.eager or len(self._items) >= self.batch or now - self._since > self.lease / 4

    async def flush(self) -> None:
        if self._items:
            await self.settle(self.queue.ack)

    async def settle(self, send: Callable[[list[Lease]], Awaitable[R]]) -> R:
        """`send(acks)` (an ack, or a claim carrying them); they are kept for the
        next try if it fails."""
        acks, self._items = self._items, []
        try:
            result = await send(acks)
        except BaseException:
            self._items[:0] = acks
            raise
        for lease in acks:
            self._emit("ack", lease.destination)
        return result
