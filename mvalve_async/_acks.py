"""A reader's acks: messages settled as done whose rows are not deleted yet.

They are batched into one DELETE per table, or sent inside the next claim's
transaction where the queue offers that (innodb: `claim_settling`, no commit of
their own); on q4m, where every unsettled lease holds an owner connection, they
go out at once. Never later than a quarter of the lease, so an acked row cannot
come back to another reader.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from .events import Emitter
from .interfaces import Lease, Queue

__all__ = ["Acks"]

R = TypeVar("R")

_ClaimSettling = Callable[[Sequence[Lease], int, float, float], Awaitable[list[Lease]]]


class Acks:
    def __init__(self, queue: Queue, emit: Emitter, lease: float, batch: int) -> None:
        self.queue = queue
        self.lease = lease
        self.batch = batch
        self._emit = emit
        self._items: list[Lease] = []
        self._since = 0.0
        self.eager = bool(getattr(queue, "leases_hold_connections", False))
        self.with_claim: _ClaimSettling | None = getattr(queue, "claim_settling", None)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, lease: Lease) -> None:
        if not self._items:
            self._since = time.time()
        self._items.append(lease)

    def due(self, now: float, *, claiming: bool) -> bool:
        """Flush before taking the next lease? `claiming`: a claim comes next (the
        acks can ride with it where the queue allows)."""
        if not self._items:
            return False
        if now - self._since > self.lease / 4:
            return True
        if not claiming or self.with_claim is not None:
            return False
        return len(self._items) >= self.batch or self.eager

    async def flush(self) -> None:
        if self._items:
            await self._settle(self.queue.ack)

    async def claim(self, limit: int, now: float, lease_seconds: float) -> list[Lease]:
        """`queue.claim(...)`, with the pending acks in the same transaction if the
        queue can do that."""
        with_claim = self.with_claim
        if with_claim is None or not self._items:
            return await self.queue.claim(limit, now, lease_seconds)
        return await self._settle(lambda acks: with_claim(acks, limit, now, lease_seconds))

    async def _settle(self, send: Callable[[list[Lease]], Awaitable[R]]) -> R:
        """Send the pending acks; kept for the next try if that fails."""
        acks, self._items = self._items, []
        try:
            result = await send(acks)
        except BaseException:
            self._items[:0] = acks
            raise
        for lease in acks:
            self._emit("ack", lease.destination)
        return result
