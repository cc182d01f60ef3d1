"""A reader's claims: the valve first, then the rows.

One claim round:
1. the reader takes destinations from the process's directory, least recently
   served first, skipping those it knows to be blocked (no free slot, paused, held
   by another reader) until when the valve said, and those it already holds;
2. a destination with a rate is *checked out* (schedule.grant: its slots, and the
   hold that keeps other readers off its rows); the state of destinations without
   a rate (a pause, a duration, an emergency window) is read in one round trip;
   when the slots granted fall short of the batch, the next destinations in line
   are asked too (at most `WAVES` times), so that one claim fills the batch;
3. one `Queue.claim` leases the emergency lane's first rows and, per destination,
   at most as many of its oldest rows as it may send now (the pending acks ride
   along): rows of a destination without a free slot are never leased, never
   moved, and cost nothing;
4. what came back becomes held slots, grouped per destination; unused slots are
   given back to the valve at once. A destination that came back short has no
   claimable row left and leaves the line (a scan brings it back), unless the
   queue says it cut the want for want of capacity (`Claimed.cut`, q4m's owner
   connections): then it stays, tried again a moment later (tuning.CUT_RETRY).

A group's hold is checked in when its last lease is handed out or given up; a
reader that dies holding one blocks that destination until the hold ends, one
lease period and a second after the claim, when its rows have come back and go
first.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import Callable, Coroutine, Sequence

from ..errors import CodecError
from ..events import Emitter
from ..interfaces import Claimed, Lane, Lease, Queue, Want
from ..message import decode
from ..throttle import Grant, Valve
from ..tuning import CUT_RETRY, GROUP_SPAN, HOLD_AFTER_LEASE, MAX_DESTINATIONS, WAVES
from .acks import Acks
from .directory import Directory
from .held import Group, Held, Slot

__all__ = ["Claimer"]

log = logging.getLogger(__name__)


def _unused(slot: Slot) -> None:
    """`slot` will not be handed out: its slot and its place in flight go back."""
    if slot.group is not None and slot.group.token:
        slot.group.unused.append(slot.entry)
        if slot.inflight:
            slot.group.freed.append(slot.inflight)


def _log_dead(lease: Lease, reason: str) -> None:
    """One line per dead letter, naming the message by the id its sender knows."""
    try:
        name = decode(lease.blob).id
    except CodecError:
        name = f"row {lease.id}"
    log.warning(
        "dead letter: %s for %s (%s)", name, lease.destination, reason,
        extra={"destination": lease.destination, "message_id": name},
    )  # fmt: skip


class Claimer:
    def __init__(
        self,
        queue: Queue,
        valve: Valve,
        directory: Directory,
        acks: Acks,
        held: Held,
        emit: Emitter,
        spawn: Callable[[Coroutine[object, object, None]], None],
        *,
        batch: int,
        lease: float,
    ) -> None:
        self.queue = queue
        self.valve = valve
        self.directory = directory
        self.acks = acks
        self.held = held
        self._emit = emit
        self._spawn = spawn
        self.batch = batch
        self.lease = lease
        self.pace = 0.0  # the consumer's seconds per message (the reader measures it)
        self.short = False  # a destination of the last round came back short
        self.next_try: dict[str, float] = {}
        self._groups: dict[str, Group] = {}  # destination -> this reader's open group
        self._name = secrets.token_hex(6)
        self._seq = itertools.count(1)

    # -- a claim round --------------------------------------------------------------

    def _blocked(self, now: float) -> Callable[[str], bool]:
        next_try, groups, blocked = self.next_try, self._groups, self.directory.blocked

        def skip(destination: str) -> bool:
            if destination in groups or next_try.get(destination, 0.0) > now:
                return True
            block = blocked(destination, now)
            # a DROP window: its messages are claimed, to go to the dead letters
            return block is not None and not block[1]

        return skip

    def next_time(self, now: float) -> float | None:
        """When this reader may next claim something (None: nothing is known)."""
        return self.directory.next_time(now, self._groups, self.next_try)

    def _picks(self, now: float, left: int, tried: set[str]) -> list[tuple[str, int]]:
        """(destination, rows wanted) in turn, until `left` rows are spoken for."""
        picks: list[tuple[str, int]] = []
        cap = self.batch if self.pace <= 0 else max(1, int(GROUP_SPAN / self.pace))
        # a place in flight taken for a message this reader's consumer is not free
        # for is a place wasted: one at a time until the consumer's pace is known
        places = 1 if self.pace <= 0 else cap  # in all, over the destinations picked
        skip = self._blocked(now)
        for destination, entry in self.directory.pick(now, skip):
            if destination in tried:
                continue
            want = left if entry.rows <= 0 else min(left, entry.rows)
            if self.valve.limit_for(destination) is not None:
                if places <= 0:
                    continue
                want = min(want, places)
                places -= want
            elif self.valve.governed(destination):
                want = min(want, cap)
            picks.append((destination, want))
            left -= want
            if left <= 0 or len(tried) + len(picks) >= MAX_DESTINATIONS:
                break
        return picks

    async def round(self, now: float, deadline: float | None) -> int:
        """One claim round (see the module docstring); returns how many slots it added
        to `held`. Raises what the queue raises (acks kept, holds given back). While
        the emergency lane may hold rows, a round claims them alone: emergencies go
        first, whatever the batch."""
        if self.directory.emergency:
            urgent = await self.acks.settle(
                lambda acks: self.queue.claim(
                    [], now, self.lease, emergency=self.batch, acks=acks, deadline=deadline
                )
            )
            self.short = False
            if len(urgent) < self.batch and not urgent.cut_emergency:
                self.directory.emergency = False
            if urgent:
                self.held.add([Slot(x, now, None) for x in urgent])
                return len(urgent)
        self.short = False
        grants: dict[str, Grant] = {}
        tokens: dict[str, str] = {}
        wants: list[Want] = []
        drops: set[str] = set()
        try:
            tried: set[str] = set()
            for _ in range(WAVES):
                left = self.batch - sum(w.n for w in wants)
                picks = self._picks(now, left, tried) if left > 0 else []
                if not picks:
                    break
                tried.update(d for d, _ in picks)
                await self._wave(now, picks, deadline, grants, tokens, wants, drops)
            emergency = self.batch if wants else 0
            if not wants and not len(self.acks):
                return 0
            leases = await self.acks.settle(
                lambda acks: self.queue.claim(
                    wants, now, self.lease, emergency=emergency, acks=acks, deadline=deadline
                )
            )
        except BaseException:
            for d, g in grants.items():  # nothing leased under these holds
                self._spawn(self.valve.checkin(d, tokens[d], unused=g.entries))
            raise
        return await self._hold(now, leases, wants, grants, tokens, drops)

    async def _wave(
        self,
        now: float,
        picks: list[tuple[str, int]],
        deadline: float | None,
        grants: dict[str, Grant],
        tokens: dict[str, str],
        wants: list[Want],
        drops: set[str],
    ) -> None:
        """Ask the valve about `picks` (their checkouts and states at once); what may
        go now joins `wants`."""
        governed = [(d, n) for d, n in picks if self.valve.governed(d)]
        plain = [(d, n) for d, n in picks if not self.valve.governed(d)]
        until = now + self.lease + HOLD_AFTER_LEASE
        for d, _ in governed:
            tokens[d] = f"{self._name}.{next(self._seq)}"
        checked, states = await asyncio.gather(
            asyncio.gather(
                *(self.valve.checkout(d, n, tokens[d], until, deadline) for d, n in governed)
            ),
            self._states([d for d, _ in plain], deadline),
        )
        for (d, _), g in zip(governed, checked, strict=True):
            if not isinstance(g, Grant):  # the store stayed away past the deadline
                self.next_try[d] = now + 0.05
            elif g.drop:
                drops.add(d)
                wants.append(Want(d, self.batch))
            elif g.slots:
                grants[d] = g
                wants.append(Want(d, len(g.slots)))
            else:
                self.next_try[d] = g.next_try
                if not g.held:  # its rate, a pause or a window holds it back
                    self._emit("defer", d)
        for d, n in plain:
            if states is None:
                self.next_try[d] = now + 0.05
                continue
            until_d, drop = states.get(d, (0.0, False))
            if drop:
                drops.add(d)
                wants.append(Want(d, self.batch))
            elif until_d > now:
                self.next_try[d] = until_d
                self.directory.block(d, until_d)
            else:
                wants.append(Want(d, n))

    async def _states(
        self, destinations: Sequence[str], deadline: float | None
    ) -> dict[str, tuple[float, bool]] | None:
        if not destinations:
            return {}
        return await self.valve.states(destinations, deadline)

    async def _hold(
        self,
        now: float,
        leases: Claimed,
        wants: list[Want],
        grants: dict[str, Grant],
        tokens: dict[str, str],
        drops: set[str],
    ) -> int:
        emergency = [x for x in leases if x.lane is Lane.EMERGENCY]
        if len(emergency) >= self.batch or leases.cut_emergency:  # there may be more
            self.directory.emergency = True
        by_dest: dict[str, list[Lease]] = {}
        for lease in leases:
            if lease.lane is not Lane.EMERGENCY:
                by_dest.setdefault(lease.destination, []).append(lease)
        slots = [Slot(x, now, None) for x in emergency]
        dead: list[Lease] = []
        for want in wants:
            d = want.destination
            got = by_dest.get(d, [])
            if len(got) < want.n and d in leases.cut:
                # the queue ran out of capacity, not of rows: it stays in line
                self.directory.served(d, len(got), len(got))
                self.next_try[d] = now + CUT_RETRY
            else:
                self.directory.served(d, len(got), want.n)
                self.short = self.short or len(got) < want.n
            if d in drops:
                dead += got
                continue
            grant = grants.get(d)
            if grant is None:
                if got:
                    group = self._groups[d] = Group(d, pending=len(got))
                    slots += [Slot(x, now, group) for x in got]
                continue
            group = Group(d, tokens[d], pending=len(got), unused=list(grant.entries[len(got) :]),
                          freed=list(grant.inflight[len(got) :]))  # fmt: skip
            if not got:
                self._spawn(
                    self.valve.checkin(d, group.token, unused=group.unused, freed=group.freed)
                )
                continue
            self._groups[d] = group
            ids = grant.inflight or ("",) * len(got)
            slots += [
                Slot(x, now, group, at, entry, place)
                for x, at, entry, place in zip(got, grant.slots, grant.entries, ids, strict=False)
            ]
        if dead:
            for lease in dead:
                _log_dead(lease, "emergency")
            await self.queue.dead(dead, "emergency")
            for lease in dead:
                self._emit("drop", lease.destination)
        self.held.add(slots)
        return len(slots)

    # -- a group's end --------------------------------------------------------------

    def done(self, slot: Slot) -> None:
        """`slot` was handed out, given up or settled otherwise: its group may end."""
        group = slot.group
        if group is None:
            return
        group.pending -= 1
        if group.pending <= 0:
            self._end(group)

    def _end(self, group: Group) -> None:
        if self._groups.get(group.destination) is group:
            del self._groups[group.destination]
        if group.token:
            self._spawn(
                self.valve.checkin(
                    group.destination, group.token, unused=group.unused, late=group.late,
                    busy=group.busy, freed=group.freed,
                )
            )  # fmt: skip

    async def give_back(self, slots: Sequence[Slot]) -> None:
        """Slots never handed out: their rows go back to their place (their delivery
        count as before) and their slots to the valve."""
        if not slots:
            return
        for slot in slots:
            _unused(slot)
        try:
            await self.queue.give_back([s.lease for s in slots])
        finally:
            for slot in slots:
                self.done(slot)

    async def dead(self, slots: Sequence[Slot], reason: str, action: str = "dead") -> None:
        """Slots whose messages go to the dead letters (their slots go back unused)."""
        if not slots:
            return
        for slot in slots:
            _unused(slot)
            if action == "drop":
                _log_dead(slot.lease, reason)
        try:
            await self.queue.dead([s.lease for s in slots], reason)
        finally:
            for slot in slots:
                self.done(slot)
                self._emit(action, slot.lease.destination)

    async def close(self) -> None:
        """Give back every held slot (the reader closes)."""
        await self.give_back(self.held.drain())
