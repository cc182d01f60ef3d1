"""What becomes of one held slot when its turn comes: its message is read (what
cannot be read, or was delivered too often, goes to the dead letters) and handed
out at its slot.

- An emergency goes out at once, past the rate; the valve records it and opens
  the emergency window, and this reader's other held messages of its destination
  follow the policy (dead letters for DROP, given back for HOLD).
- A message of a destination with a rate goes out at its slot: `delivered_at` is
  the slot. One handed out later than its margin (a slow consumer ahead of it)
  first checks that its destination was not paused or hit by an emergency
  meanwhile, and goes out with `delivered_at` = now; the group's later slots,
  spaced from it, move as much, and the group's checkin moves their log entries.
- A message with a duration keeps its destination busy: the rest of its group is
  given back (their rows keep their place) and the duration recorded.
"""

from __future__ import annotations

import logging

from ..clock import Clock
from ..errors import CodecError, InvalidMessage
from ..events import Emitter
from ..message import Message, decode, validate_destination
from ..throttle import EmergencyPolicy, Valve
from .claims import Claimer
from .held import Held, Slot

__all__ = ["Handout"]

log = logging.getLogger(__name__)


class Handout:
    def __init__(
        self, claimer: Claimer, valve: Valve, held: Held, clock: Clock, emit: Emitter, *,
        max_deliveries: int, max_destination: int,
    ) -> None:  # fmt: skip
        self.claimer = claimer
        self.valve = valve
        self.held = held
        self.clock = clock
        self._emit = emit
        self.max_deliveries = max_deliveries
        self.max_destination = max_destination

    async def process(self, slot: Slot, deadline: float | None) -> Message | None:
        """The message to hand out now, or None (dead-lettered, given back, or kept
        for later when the store is down past the caller's deadline)."""
        msg = await self._read(slot)
        if msg is None:
            return None
        group = slot.group
        now = self.clock.now()
        directory = self.claimer.directory
        if group is not None and (block := directory.blocked(msg.destination, now)):
            # paused, busy or in an emergency window, as a reader of this process
            # learned after this slot was claimed: it goes back (or to the dead letters)
            rest = [slot, *self.held.rest(group)]
            if block[1]:
                await self.claimer.dead(rest, "emergency", "drop")
            else:
                await self.claimer.give_back(rest)
            self.claimer.next_try[msg.destination] = block[0]
            return None
        if group is None:
            window = await self.valve.emergency(msg.destination, msg.duration, deadline)
            if window is None:  # store down past the caller's deadline: keep it
                self.held.put_back(slot)
                return None
            if window:
                policy = self.valve.policy
                directory.block(msg.destination, window, policy is EmergencyPolicy.DROP)
                await self._window(msg.destination)
            return self._out(slot, msg, now)
        if group.token:
            rate = self.valve.rate_for(msg.destination)
            margin = self.valve.margin_for(rate)
            at = slot.at
            if now > at + margin:
                state = await self.valve.peek(msg.destination, deadline)
                if state is not None and (state[1] or state[0] > now):
                    rest = [slot, *self.held.rest(group)]
                    if state[1]:
                        await self.claimer.dead(rest, "emergency", "drop")
                    else:
                        await self.claimer.give_back(rest)
                    return None
                at = self.clock.now()
                group.late.append((slot.entry, round(at + margin + self.clock.error, 6)))
                # the group's later slots were spaced from this one: they move as much
                shift = at - slot.at
                for later in self.held.of_group(group):
                    moved = round(later.entry + shift, 6)
                    group.late.append((later.entry, moved))
                    later.at, later.entry = round(later.at + shift, 6), moved
            if msg.duration:
                group.busy = at + margin + self.clock.error + msg.duration
                directory.block(msg.destination, group.busy)
                await self.claimer.give_back(self.held.rest(group))
            return self._out(slot, msg, at)
        if msg.duration:
            await self.valve.busy(msg.destination, now + msg.duration)
            directory.block(msg.destination, now + msg.duration)
            await self.claimer.give_back(self.held.rest(group))
        return self._out(slot, msg, now)

    def _out(self, slot: Slot, msg: Message, at: float) -> Message:
        msg.deliveries = slot.lease.deliveries
        msg.delivered_at = round(at, 6)
        msg.lane = str(slot.lease.lane)
        self.claimer.done(slot)
        self._emit("dequeue", msg.destination)
        return msg

    async def _window(self, destination: str) -> None:
        """An emergency opened a window on `destination`: this reader's other held
        messages of it follow the policy."""
        rest = self.held.of(destination)
        if not rest:
            return
        if self.valve.policy is EmergencyPolicy.DROP:
            await self.claimer.dead(rest, "emergency", "drop")
        else:
            await self.claimer.give_back(rest)

    async def _read(self, slot: Slot) -> Message | None:
        """The slot's message, or None when it went to the dead letters (unreadable,
        or delivered too many times)."""
        lease = slot.lease
        try:
            msg = decode(lease.blob)
            if msg.destination != lease.destination:
                raise CodecError("the blob's destination differs from the row's")
            validate_destination(msg.destination, self.max_destination)
        except (CodecError, InvalidMessage) as exc:
            log.error(
                "dead letter: unreadable row %s in %s: %s", lease.id, lease.table, exc,
                extra={"destination": lease.destination},
            )  # fmt: skip
            await self.claimer.dead([slot], f"unreadable: {exc}")
            return None
        if lease.deliveries > self.max_deliveries:
            log.error(
                "dead letter: %s delivered %d times", msg.id, lease.deliveries - 1,
                extra={"destination": msg.destination, "message_id": msg.id},
            )  # fmt: skip
            await self.claimer.dead([slot], "too many deliveries")
            return None
        return msg
