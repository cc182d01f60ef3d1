"""Readers: lease rows in batches, pass each through the valve (_admission.py
decides what becomes of each), hand out messages.

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
from ._admission import Admission
from ._held import Held, Slot
from .errors import QueueUnavailable, ReaderBusy
from .events import Emitter, Observer
from .interfaces import Lane, Lease, Queue, Store
from .message import DEFAULT_MAX_DESTINATION, Message, validate_destination
from .notify import Notifier
from .schedule import EmergencyPolicy, Rate
from .valve import Valve

__all__ = ["Reader"]

log = logging.getLogger(__name__)


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
        self._admission = Admission(
            queue, self.valve, self._held, self._emit,
            max_deliveries=max_deliveries, max_destination=max_destination,
        )  # fmt: skip
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
            due = [t for t in (next_due, self._admission.next_due) if t is not None]
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
            due_at = self._admission.next_due
            if due_at is not None and time.time() >= due_at:
                self._admission.next_due = None
                return True

    async def _process(self, slot: Slot, deadline: float | None) -> Message | None:
        lease = slot.lease
        try:
            return await self._admission.process(slot, deadline)
        except asyncio.CancelledError:
            # Any queue operation may or may not have committed: release under the
            # lease token (a no-op if the row moved), never hand this lease out again.
            self._spawn(self.queue.release(lease))
            raise

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
