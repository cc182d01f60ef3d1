"""Readers: lease rows in batches, pass each through the valve, hand out messages.

Settling follows Q4M's rule: the message a reader handed out is acknowledged
when the same reader is asked for the next one (or by `ack()`); acks are
batched into one DELETE per table. No connection or transaction is held while
user code runs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType

from ._acks import Acks
from ._held import Held, Slot
from .errors import CodecError, InvalidMessage, QueueUnavailable, ReaderBusy
from .events import Emitter, Observer
from .interfaces import Lane, Lease, Queue, Store
from .message import DEFAULT_MAX_DESTINATION, Message, decode, validate_destination
from .notify import Notifier
from .schedule import Action, EmergencyPolicy, Rate
from .valve import Valve

__all__ = ["Reader"]

log = logging.getLogger(__name__)


# Waiting for an older message: ask again when the valve says (about a store round
# trip per older message ahead), but no sooner than 2, 4, 8, then 10 ms (each ask is a
# store round trip); after ORDER_PATIENCE seconds the older one is presumed stuck.
ORDER_PATIENCE = 0.15


def _order_backoff(waits: int) -> float:
    return min(0.002 * 2.0**waits, 0.010)


class Reader:
    """Takes messages out, never more than each destination's rate.

    `rate` is the default per destination (None: unlimited), `rates` overrides it
    per destination. `batch` rows are leased per claim; `lease` seconds is how
    long a claimed row stays invisible if its consumer dies. `margin` widens each
    rate window by that many seconds (default: 1 % of `per`, at most 10 ms) so the
    promise also holds on the times the consumer receives messages, not only on
    the valve's `delivered_at`; 0 gives the last percent of throughput back.
    While the store is unreachable the reader waits and retries; with
    `fallback_store=MemoryStore()` it throttles locally instead (opt-in: the rate
    then holds per process only, until the store is back).
    """

    def __init__(
        self,
        queue: Queue,
        store: Store,
        *,
        rate: Rate | None = None,
        rates: Mapping[str, Rate | None] | None = None,
        emergency_policy: EmergencyPolicy | str = EmergencyPolicy.DROP,
        lease: float = 30.0,
        batch: int = 16,
        ack_batch: int = 64,
        max_deliveries: int = 10,
        max_destination: int = DEFAULT_MAX_DESTINATION,
        idle_interval: float = 0.06,
        notifier: Notifier | None = None,
        observers: Sequence[Observer] = (),
        margin: float | None = None,
        fallback_store: Store | None = None,
    ) -> None:
        if lease <= 0 or batch < 1 or max_deliveries < 1:
            raise ValueError("lease, batch and max_deliveries must be positive")
        self.queue = queue
        self.valve = Valve(
            store, rate=rate, rates=rates, policy=emergency_policy, margin=margin,
            fallback=fallback_store,
        )  # fmt: skip
        self.lease = lease
        self.batch = batch
        self.ack_batch = ack_batch
        self.max_deliveries = max_deliveries
        self.max_destination = max_destination
        self.idle_interval = idle_interval
        self._notifier = notifier
        self._emit = Emitter(observers)
        self._wake = notifier.subscribe() if notifier else asyncio.Event()
        self._held = Held(lease)
        self._current: tuple[Lease, Message] | None = None
        self._acks = Acks(queue, self._emit, lease, ack_batch)
        self._local_due: float | None = None
        self._busy = False
        self._closed = False
        self._background: set[asyncio.Task[None]] = set()

    # -- the consumer's API -------------------------------------------------

    async def next(self, timeout: float | None = None) -> Message | None:
        """The next deliverable message, or None after `timeout` seconds
        (None: wait for ever). Settles the previously handed-out message as done."""
        if self._busy:
            raise ReaderBusy("this reader is already awaited by another task")
        if self._closed:
            raise RuntimeError("reader is closed")
        self._busy = True
        try:
            self._settle_current()
            loop = asyncio.get_running_loop()
            deadline = None if timeout is None else loop.time() + timeout
            backoff = 0.05
            while True:
                try:
                    slot = await self._take()
                    if slot is None:
                        await self._acks.flush()
                        if not await self._idle(deadline):
                            return None
                        continue
                    msg = await self._process(slot, deadline)
                except QueueUnavailable as exc:
                    # The server went away (restart, network): wait and reconnect.
                    # Leases held meanwhile expire or come back by themselves.
                    log.warning("queue unavailable (%s); retrying in %.2fs", exc, backoff)
                    if deadline is not None and loop.time() + backoff > deadline:
                        return None
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.05
                if msg is not None:
                    self._current = (slot.lease, msg)
                    return msg
                if deadline is not None and loop.time() >= deadline:
                    return None
        finally:
            self._busy = False

    @property
    def closed(self) -> bool:
        return self._closed

    def __aiter__(self) -> Reader:
        return self

    async def __anext__(self) -> Message:
        if self._closed:
            raise StopAsyncIteration
        msg = await self.next()
        assert msg is not None  # no timeout
        return msg

    @contextlib.asynccontextmanager
    async def receive(self, timeout: float | None = None) -> AsyncIterator[Message | None]:
        """`async with reader.receive() as msg`: acked when the body succeeds,
        returned to the queue when it raises (or is cancelled)."""
        msg = await self.next(timeout)
        try:
            yield msg
        except BaseException:
            if msg is not None and self._owns(msg):
                await _shielded(self.retry(msg))
            raise
        if msg is not None and self._owns(msg):
            self._settle_current()

    async def ack(self, msg: Message | None = None) -> None:
        """Acknowledge the handed-out message now (one DELETE)."""
        lease = self._take_current(msg)
        if lease is not None:
            await self.queue.ack([lease])
            self._emit("ack", lease.destination)

    async def retry(self, msg: Message | None = None, delay: float = 0.0) -> None:
        """Return the handed-out message to its queue, visible again after `delay`."""
        lease = self._take_current(msg)
        if lease is not None:
            await self.queue.release(lease, delay)
            self._emit("abort", lease.destination)

    async def reject(self, msg: Message | None = None, reason: str = "rejected") -> None:
        """Move the handed-out message to the dead letters with `reason`."""
        lease = self._take_current(msg)
        if lease is not None:
            await self.queue.dead([lease], reason)
            self._emit("dead", lease.destination)

    async def pause(self, destination: str, seconds: float) -> None:
        """Deliver nothing to `destination` for `seconds` (e.g. a 429 Retry-After);
        shared by every reader of the store."""
        validate_destination(destination, self.max_destination)
        now, shift = await self.valve.pause(destination, seconds)
        if shift > 0:  # reserved messages keep their order and spacing, later
            await self.queue.shift(destination, now, shift)

    async def resume(self, destination: str) -> None:
        await self.valve.resume(destination)

    async def close(self) -> None:
        """Ack the handed-out message, flush acks, return prefetched leases."""
        if self._closed:
            return
        self._closed = True
        self._settle_current()
        with contextlib.suppress(Exception):
            await _shielded(self._acks.flush())
        for lease in self._held.drain():
            with contextlib.suppress(Exception):
                await _shielded(self.queue.release(lease))
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._notifier is not None:
            self._notifier.unsubscribe(self._wake)

    async def __aenter__(self) -> Reader:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is not None and self._current is not None:
            lease = self._take_current(None)
            if lease is not None:
                with contextlib.suppress(Exception):
                    await _shielded(self.queue.release(lease))
        await self.close()

    # -- internals ------------------------------------------------------------

    def _owns(self, msg: Message) -> bool:
        return self._current is not None and self._current[1] is msg

    def _take_current(self, msg: Message | None) -> Lease | None:
        if self._current is None:
            return None
        if msg is not None and self._current[1] is not msg:
            raise ValueError("that message is not the one this reader handed out last")
        lease = self._current[0]
        self._current = None
        return lease

    def _settle_current(self) -> None:
        if self._current is not None:
            self._acks.add(self._current[0])
            self._current = None

    async def _take(self) -> Slot | None:
        now = time.time()
        if self._acks.due(now, claiming=not self._held):
            await self._acks.flush()
        slot, wait = self._held.take(now)
        if slot is None and self._held:  # only parked leases, none due yet
            await asyncio.sleep(wait)
            slot, _ = self._held.take(time.time())
        if slot is not None:
            return slot
        leases = await self._acks.claim(self.batch, now, self.lease)
        if not leases:
            return None
        if len(leases) > 1:
            await self._announce(leases)
        self._held.add(leases, now)
        return self._held.take(now)[0]

    async def _announce(self, leases: Sequence[Lease]) -> None:
        """Register a batch's throttled messages with the valve (see Valve.claimed):
        readers that claimed younger ones of the same destinations let these go
        first. One concurrent store round trip per destination."""
        seqs: dict[str, list[int]] = {}
        rate_for = self.valve.rate_for
        for lease in leases:
            if lease.created and lease.lane is not Lane.EMERGENCY:
                if lease.destination in seqs:
                    seqs[lease.destination].append(lease.created)
                elif rate_for(lease.destination) is not None:  # unthrottled: no order kept
                    seqs[lease.destination] = [lease.created]
        if len(seqs) == 1:
            ((dest, mine),) = seqs.items()
            await self.valve.claimed(dest, mine)
        elif seqs:
            await asyncio.gather(*(self.valve.claimed(d, s) for d, s in seqs.items()))

    async def _idle(self, deadline: float | None) -> bool:
        """Wait until a row may be claimable. False when the deadline passed."""
        loop = asyncio.get_running_loop()
        while True:
            now = time.time()
            ready, next_due = await self.queue.poll(now)
            if ready:
                return True
            due = [t for t in (next_due, self._local_due) if t is not None]
            wait = self.idle_interval
            if due:
                wait = min(wait, max(0.0, min(due) - now))
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    return False
                wait = min(wait, left)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            if self._wake.is_set():
                return True
            if self._local_due is not None and time.time() >= self._local_due:
                self._local_due = None
                return True

    async def _process(self, slot: Slot, deadline: float | None) -> Message | None:
        lease = slot.lease
        try:
            return await self._process_inner(slot, deadline)
        except asyncio.CancelledError:
            # Any queue operation may or may not have committed: release under the
            # lease token (a no-op if the row moved), never hand this lease out again.
            self._spawn(self.queue.release(lease))
            raise

    async def _process_inner(self, slot: Slot, deadline: float | None) -> Message | None:
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
            if self._held:
                self._held.park(slot, retry)
                return None
            slot.waits += 1
            await asyncio.sleep(max(0.0, retry - time.time()))
        if decision is None:  # store down past the caller's deadline: keep the lease
            self._held.put_back(slot)
            return None
        if decision.shift > 0:  # an emergency opened a HOLD window: push the backlog back
            await self.queue.shift(msg.destination, decision.at, decision.shift)
        if decision.action is Action.DEFER:
            if decision.moves:  # an older message takes a younger one's earlier slot
                await self.queue.reschedule(msg.destination, decision.moves)
            await self.queue.move(lease, decision.at, decision.reserved)
            self._emit("defer", msg.destination)
            if self._local_due is None or decision.at < self._local_due:
                self._local_due = decision.at
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
            if self._held:  # go on with the others meanwhile
                slot.ready = msg
                self._held.park(slot, decision.at)
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
        if late <= self.valve.margin_for(self.valve.rate_for(msg.destination)):
            return True
        if self.valve.margin == 0:
            return True
        log.debug(
            "%s let through for %.6f, handed out %.3fs later: confirming it again",
            msg.id, msg.delivered_at, late, extra={"destination": msg.destination},
        )  # fmt: skip
        return False

    def _hand_out(self, msg: Message) -> Message:
        self._emit("dequeue", msg.destination)
        return msg

    def _spawn(self, coro: collections.abc.Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def __repr__(self) -> str:
        return f"Reader(queue={self.queue!r}, rate={self.valve.rate!r})"


async def _shielded(coro: collections.abc.Coroutine[object, object, None]) -> None:
    """Run a settling operation to completion even if the caller is cancelled."""
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.gather(task, return_exceptions=True)
        raise
