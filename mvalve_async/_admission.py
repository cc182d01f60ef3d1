"""What becomes of one claimed lease: its message is read (what cannot be read,
or was delivered too often, goes to the dead letters), the valve decides, and the
answer is carried out: hand it out, park it (an older message of its destination
goes first, or its hand-out time is a moment ahead), move it to the timed lane,
or to the dead letters.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ._held import Held, Slot
from .errors import CodecError, InvalidMessage
from .events import Emitter
from .interfaces import Lane, Lease, Queue
from .message import Message, decode, validate_destination
from .schedule import Action
from .valve import Valve

__all__ = ["ORDER_PATIENCE", "Admission"]

log = logging.getLogger(__name__)


# Waiting for an older message: ask again when the valve says (about a store round
# trip per older message ahead), but no sooner than 2, 4, 8, then 10 ms (each ask is a
# store round trip); after ORDER_PATIENCE seconds the older one is presumed stuck.
ORDER_PATIENCE = 0.15


def _order_backoff(waits: int) -> float:
    return min(0.002 * 2.0**waits, 0.010)


class Admission:
    def __init__(
        self, queue: Queue, valve: Valve, held: Held, emit: Emitter, *,
        max_deliveries: int, max_destination: int,
    ) -> None:  # fmt: skip
        self.queue = queue
        self.valve = valve
        self.held = held
        self._emit = emit
        self.max_deliveries = max_deliveries
        self.max_destination = max_destination
        self.next_due: float | None = None  # the earliest a deferral of ours comes due

    async def process(self, slot: Slot, deadline: float | None) -> Message | None:
        """The message to hand out now, or None (parked, deferred, dead-lettered, or
        kept for later when the store is down past the caller's deadline)."""
        lease = slot.lease
        retime: float | None = None
        if slot.ready is not None:  # let through earlier for a time now come
            msg, slot.ready = slot.ready, None
            if self._in_time(msg):
                return self._hand_out(msg)
            # Past its margin (the reader or its consumer was busy): confirmed again
            # from now. With a duration it is decided afresh (its busy window ran
            # from the old time), its first hand-out wasted.
            retime = None if msg.duration else msg.delivered_at
        else:
            read = await self._read(lease)
            if read is None:
                return None
            msg = read
        while True:
            decision = await self.valve.decide(
                msg.destination,
                duration=msg.duration,
                emergency=lease.lane is Lane.EMERGENCY,
                reserved=lease.reserved,
                deadline=deadline,
                seq=lease.created,
                force=slot.waiting > 0 and time.time() - slot.waiting >= ORDER_PATIENCE,
                retime=retime,
            )
            if decision is None or decision.action is not Action.WAIT:
                break
            # Another reader holds an older message of this destination: let it go
            # first, and meanwhile go on with this reader's other messages.
            slot.waiting = slot.waiting or time.time()
            retry = max(decision.at, time.time() + _order_backoff(slot.waits))
            if self.held:
                self.held.park(slot, retry)
                return None
            slot.waits += 1
            await asyncio.sleep(max(0.0, retry - time.time()))
        if decision is None:  # store down past the caller's deadline: keep the lease
            self.held.put_back(slot)
            return None
        if decision.shift > 0:  # an emergency opened a HOLD window: push the backlog back
            await self.queue.shift(msg.destination, decision.at, decision.shift)
        if decision.action is Action.DEFER:
            if decision.moves:  # an older message takes a younger one's earlier slot
                await self.queue.reschedule(msg.destination, decision.moves)
            await self.queue.move(lease, decision.at, decision.reserved)
            self._emit("defer", msg.destination)
            if self.next_due is None or decision.at < self.next_due:
                self.next_due = decision.at
            log.debug(
                "deferred %s to %.3f", msg.id, decision.at,
                extra={"destination": msg.destination, "message_id": msg.id},
            )  # fmt: skip
            return None
        if decision.action is Action.DEAD:
            log.warning(
                "dead letter: %s for %s (%s)", msg.id, msg.destination, decision.reason,
                extra={"destination": msg.destination, "message_id": msg.id},
            )  # fmt: skip
            await self.queue.dead([lease], decision.reason)
            self._emit("drop" if decision.reason == "emergency" else "dead", msg.destination)
            return None
        msg.deliveries = lease.deliveries
        msg.delivered_at = decision.at
        msg.lane = str(lease.lane)
        wait = decision.at - time.time()
        if wait > 0:
            if self.held:  # go on with the others meanwhile
                slot.ready = msg
                self.held.park(slot, decision.at)
                return None
            await asyncio.sleep(wait)
        return self._hand_out(msg)

    async def _read(self, lease: Lease) -> Message | None:
        """The lease's message, or None when it went to the dead letters (unreadable,
        or delivered too many times)."""
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
            await self.queue.dead([lease], f"unreadable: {exc}")
            self._emit("dead", lease.destination)
            return None
        if lease.deliveries > self.max_deliveries:
            log.error(
                "dead letter: %s delivered %d times", msg.id, lease.deliveries - 1,
                extra={"destination": msg.destination, "message_id": msg.id},
            )  # fmt: skip
            await self.queue.dead([lease], "too many deliveries")
            self._emit("dead", lease.destination)
            return None
        return msg

    def _in_time(self, msg: Message) -> bool:
        """Can a parked message go out as let through, this long after its recorded
        hand-out? Within the margin (which absorbs such lag), or with margin 0 (the
        promise is then on delivered_at alone)."""
        assert msg.delivered_at is not None
        late = time.time() - msg.delivered_at
        margin = self.valve.margin_for(self.valve.rate_for(msg.destination))
        if late <= margin or self.valve.margin == 0:
            return True
        log.debug(
            "%s let through for %.6f, handed out %.3fs later: confirming it again",
            msg.id, msg.delivered_at, late, extra={"destination": msg.destination},
        )  # fmt: skip
        return False

    def _hand_out(self, msg: Message) -> Message:
        self._emit("dequeue", msg.destination)
        return msg
