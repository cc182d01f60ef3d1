"""The leases a reader holds but has not handed out yet, in hand-out order.

A claim gives a reader emergency leases and, per destination, a *group*: that
destination's oldest rows, each with its slot (the time the valve granted for it)
when the destination has a rate. A group is handed out in order; a slot not due
yet waits aside while the reader goes on with other groups (a later slot of the
same group is never due before an earlier one, so order holds). A group ends when
its last lease is handed out or given up: then its hold is checked in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..interfaces import Lease

__all__ = ["Group", "Held", "Slot"]


@dataclass(eq=False, slots=True)
class Group:
    """One destination's leases from one claim. `token` is the valve's hold (a
    destination with a rate), "" for a destination without one. The lists gather
    what its checkin reports: entries of `unused` slots, `late` hand-outs
    (entry, actual), the end of a duration begun (`busy`), and the places in flight
    of messages never handed out (`freed`)."""

    destination: str
    token: str = ""
    pending: int = 0  # leases not handed out or given up yet
    unused: list[float] = field(default_factory=list)
    late: list[tuple[float, float]] = field(default_factory=list)
    busy: float = 0.0
    freed: list[str] = field(default_factory=list)  # in-flight ids of slots not used


@dataclass(eq=False, slots=True)
class Slot:
    lease: Lease
    claimed: float  # shared-clock time of the claim: its lease runs from then
    group: Group | None  # None: an emergency lease
    at: float = 0.0  # its slot (a destination with a rate): never handed out before
    entry: float = 0.0  # its slot's entry in the destination's log
    inflight: str = ""  # its place in flight (a concurrency limit): freed when settled


class Held:
    def __init__(self) -> None:
        self._slots: list[Slot] = []

    def __len__(self) -> int:
        return len(self._slots)

    def add(self, slots: list[Slot]) -> None:
        self._slots.extend(slots)

    def put_back(self, slot: Slot) -> None:
        """First in line again (the store was down past the caller's deadline)."""
        self._slots.insert(0, slot)

    def due(self, now: float) -> int:
        return sum(1 for s in self._slots if s.at <= now)

    def take(self, now: float, max_age: float) -> tuple[Slot | None, float, list[Slot]]:
        """(the next slot due, seconds until the next one is due when none is, slots
        held longer than `max_age` since their claim: their leases are about to end,
        the caller gives them up)."""
        stale = [s for s in self._slots if now - s.claimed > max_age]
        if stale:
            self._slots = [s for s in self._slots if now - s.claimed <= max_age]
        for i, slot in enumerate(self._slots):
            if slot.at <= now:
                del self._slots[i]
                return slot, 0.0, stale
        wait = min((s.at - now for s in self._slots), default=0.0)
        return None, max(0.0, wait), stale

    def next_at(self) -> float | None:
        """When the earliest held slot comes due (None: nothing held)."""
        return min((s.at for s in self._slots), default=None)

    def of_group(self, group: Group) -> list[Slot]:
        """The slots of `group` still held (left in place)."""
        return [s for s in self._slots if s.group is group]

    def rest(self, group: Group) -> list[Slot]:
        """Take out every slot of `group` still held."""
        out = [s for s in self._slots if s.group is group]
        if out:
            self._slots = [s for s in self._slots if s.group is not group]
        return out

    def of(self, destination: str) -> list[Slot]:
        """Take out every slot of `destination` still held (any group)."""
        out = [s for s in self._slots if s.lease.destination == destination]
        if out:
            self._slots = [s for s in self._slots if s.lease.destination != destination]
        return out

    def holds(self, destination: str) -> bool:
        return any(s.lease.destination == destination for s in self._slots)

    def drain(self) -> list[Slot]:
        """Every held slot; holds nothing after."""
        out, self._slots = self._slots, []
        return out
