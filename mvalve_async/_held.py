"""The leases a reader holds but has not handed out yet.

Prefetched leases wait in claim order. A lease whose message must let an older
one of its destination go first (the valve said WAIT) is parked rather than
waited on, so the reader goes on with its other messages meanwhile: waiting in
line would stall every destination behind one, and two readers each waiting on
the other's older message would stall both. So is a message the valve let through
for a time a little ahead: sleeping on it would hold back the due ones behind it.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

from .interfaces import Lease
from .message import Message

__all__ = ["Held", "Slot"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Slot:
    lease: Lease
    claimed: float  # when the claim was made (wall clock): its lease runs from then
    waits: int = 0  # WAIT answers so far
    waiting: float = 0.0  # when the first came (wall clock), 0: none yet
    retry: float = 0.0  # parked until then
    # the valve's DELIVER, if it came for a time ahead: parked until then, and then
    # handed out as it is (its hand-out is recorded: it must not be decided twice)
    ready: Message | None = None


class Held:
    def __init__(self, lease_seconds: float) -> None:
        self.lease_seconds = lease_seconds
        self._queue: collections.deque[Slot] = collections.deque()
        self._parked: list[Slot] = []

    def __len__(self) -> int:
        return len(self._queue) + len(self._parked)

    def add(self, leases: list[Lease], claimed: float) -> None:
        self._queue.extend(Slot(lease, claimed) for lease in leases)

    def put_back(self, slot: Slot) -> None:
        """First in line again (the store was down past the caller's deadline)."""
        self._queue.appendleft(slot)

    def park(self, slot: Slot, retry: float) -> None:
        slot.waits += 1
        slot.retry = retry
        self._parked.append(slot)

    def take(self, now: float) -> tuple[Slot | None, float]:
        """The next lease to process, or (None, seconds until a parked one is due).
        A parked lease that is due goes first (it is older than what follows it);
        leases too close to expiry are dropped (another reader may have them)."""
        while True:
            due = [s for s in self._parked if s.retry <= now]
            if due:
                slot = min(due, key=lambda s: s.retry)
                self._parked.remove(slot)
            elif self._queue:
                slot = self._queue.popleft()
            elif self._parked:
                return None, max(0.0, min(s.retry for s in self._parked) - now)
            else:
                return None, 0.0
            if now - slot.claimed < self.lease_seconds * 0.8:
                return slot, 0.0
            log.warning(
                "dropping a held lease near expiry (%s)", slot.lease.destination,
                extra={"destination": slot.lease.destination},
            )  # fmt: skip

    def drain(self) -> list[Lease]:
        """Every held lease, in the order they were claimed; holds nothing after."""
        slots = sorted([*self._parked, *self._queue], key=lambda s: s.claimed)
        self._queue.clear()
        self._parked.clear()
        return [s.lease for s in slots]
