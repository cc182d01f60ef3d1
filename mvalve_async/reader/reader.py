"""`Reader`: takes messages out, never more than each destination's rate.

The valve decides before rows are leased (claims.py): per destination it says how
many messages may go now, and the reader leases at most that many of the
destination's oldest rows. Rows of a destination without a free slot stay where
they are, so one destination's backlog costs the others nothing, and a
destination's messages leave in insertion order whatever the number of readers.

Settling follows Q4M's rule: the message a reader handed out is acknowledged when
the same reader is asked for the next one (or by `ack()`); acks are batched and
ride with the next claim. No connection or transaction is held while user code
runs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import TypedDict

from ..errors import QueueBusy, QueueUnavailable, ReaderBusy
from ..events import Emitter, Observer
from ..interfaces import Lease, Queue, Store
from ..message import DEFAULT_MAX_DESTINATION, Message, validate_destination
from ..throttle import EmergencyPolicy, Rate, Valve
from ..tuning import GRACE, RECORD_MARGIN, ROUNDS, SCAN_BUSY
from .acks import Acks
from .claims import Claimer
from .directory import directory_for
from .handout import Handout
from .held import Held, Slot

__all__ = ["Reader", "ReaderOptions"]

log = logging.getLogger(__name__)


class ReaderOptions(TypedDict, total=False):
    """`Reader`'s keyword options, for what passes them on (`Pipe.reader`,
    `Pipe.serve`) with their types checked: those not given take `Reader`'s
    defaults. Keep in step with `Reader.__init__` (tests/unit/test_pipe_signatures.py
    compares them)."""

    rate: Rate | None
    rates: Mapping[str, Rate | None] | None
    emergency_policy: EmergencyPolicy | str
    lease: float
    batch: int
    ack_batch: int
    max_deliveries: int
    max_destination: int
    idle_interval: float
    observers: Sequence[Observer]
    margin: float | None
    fallback_store: Store | None
    concurrency_limit: int | None
    concurrency_limits: Mapping[str, int | None] | None
    record_margin: float


class Reader:
    """Takes messages out, never more than each destination's rate.

    `rate` is the default per destination (None: unlimited), `rates` overrides it
    per destination. Up to `batch` rows are leased per claim; `lease` seconds is
    how long a claimed row stays invisible if its consumer dies. `margin` is how
    late after its slot a message may be handed out (default: 1 % of `per`, at
    most 10 ms); each rate window is widened by it, so the promise also holds on
    the times the consumer receives messages, not only on `delivered_at`. While
    the store is unreachable the reader waits and retries; with
    `fallback_store=MemoryStore()` it throttles locally instead (opt-in: the rate
    then holds per process only, until the store is back). `record_margin` is how
    long a destination's record in the store outlives what it remembers (60 s).
    Raises ConfigError when a rate's window is longer than the store keeps records.

    `concurrency_limit` (default per destination; `concurrency_limits` overrides it
    per destination, None: none) limits the messages of a destination handed out and
    not settled yet (acked, retried, rejected, or their lease ended), over every
    reader of every process: a limit of k is k places in flight, kept in the
    destination's record; a reader that dies holding one frees it when its lease
    ends. With a rate, both hold. Emergencies are outside it, as outside the rate.
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
        observers: Sequence[Observer] = (),
        margin: float | None = None,
        fallback_store: Store | None = None,
        concurrency_limit: int | None = None,
        concurrency_limits: Mapping[str, int | None] | None = None,
        record_margin: float = RECORD_MARGIN,
    ) -> None:
        if lease <= 0 or batch < 1 or max_deliveries < 1:
            raise ValueError("lease, batch and max_deliveries must be positive")
        self.queue = queue
        self.clock = queue.clock
        self.valve = Valve(
            store, self.clock, rate=rate, rates=rates, policy=emergency_policy, margin=margin,
            fallback=fallback_store, concurrency=concurrency_limit,
            concurrencies=concurrency_limits,
            record_margin=record_margin,
        )  # fmt: skip
        self.lease = lease
        self.batch = batch
        self.ack_batch = ack_batch
        self.max_deliveries = max_deliveries
        self.max_destination = max_destination
        self.idle_interval = idle_interval
        self._emit = Emitter(observers)
        self._directory = directory_for(queue)
        self._wake = self._directory.news.subscribe()
        self._held = Held()
        self._acks = Acks(queue, self._emit, lease, ack_batch)
        self._claimer = Claimer(
            queue, self.valve, self._directory, self._acks, self._held, self._emit, self._spawn,
            batch=batch, lease=lease,
        )  # fmt: skip
        self._handout = Handout(
            self._claimer, self.valve, self._held, self.clock, self._emit,
            max_deliveries=max_deliveries, max_destination=max_destination,
        )  # fmt: skip
        self._current: tuple[Lease, Message] | None = None
        self._place: tuple[str, str] | None = None  # (destination, in-flight id) of it
        self._freeing: list[tuple[str, str]] = []  # places of settled messages to free
        self._returned = 0.0  # monotonic time next() last returned a message
        self._busy_claims = False  # the last claim round found rows
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
            self._measure_pace()
            self._settle_current()
            if self._freeing:
                await self._release()
            loop = asyncio.get_running_loop()
            deadline = None if timeout is None else loop.time() + timeout
            # what a store or queue call may take at most: a call begun just before
            # the deadline still gets its moment, and `next` returns by deadline + GRACE
            bound = None if deadline is None else deadline + GRACE
            backoff = 0.05
            while True:
                try:
                    slot = await self._take(bound)
                    msg = None if slot is None else await self._process(slot, bound)
                    if slot is None and not await self._idle(deadline, bound):
                        return None
                except (QueueUnavailable, QueueBusy) as exc:
                    # The server went away (restart, network), or kept rolling the
                    # work back (locks, a cluster's certification): wait and try
                    # again. Leases held meanwhile expire or come back by themselves.
                    log.warning("queue unavailable (%s); retrying in %.2fs", exc, backoff)
                    if deadline is not None and loop.time() + backoff > deadline:
                        return None
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.05
                if msg is not None and slot is not None:
                    self._current = (slot.lease, msg)
                    self._place = (msg.destination, slot.inflight) if slot.inflight else None
                    self._returned = time.monotonic()
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
            await self._release()

    async def retry(self, msg: Message | None = None, delay: float = 0.0) -> None:
        """Return the handed-out message to its queue, visible again after `delay`."""
        lease = self._take_current(msg)
        if lease is not None:
            await self.queue.release(lease, delay)
            self._directory.put(lease.destination, self.clock.now() + delay)
            self._emit("abort", lease.destination)
            await self._release()

    async def reject(self, msg: Message | None = None, reason: str = "rejected") -> None:
        """Move the handed-out message to the dead letters with `reason`."""
        lease = self._take_current(msg)
        if lease is not None:
            await self.queue.dead([lease], reason)
            self._emit("dead", lease.destination)
            await self._release()

    async def pause(self, destination: str, seconds: float) -> None:
        """Deliver nothing to `destination` for `seconds` (e.g. a 429 Retry-After);
        shared by every reader of the store. Its rows stay where they are."""
        validate_destination(destination, self.max_destination)
        until = await self.valve.pause(destination, seconds)
        self._directory.block(destination, until)  # the process's other readers at once
        self._claimer.next_try[destination] = until
        await self._claimer.give_back(self._held.of(destination))

    async def resume(self, destination: str) -> None:
        await self.valve.resume(destination)
        self._directory.unblock(destination)
        self._claimer.next_try.pop(destination, None)

    async def close(self) -> None:
        """Ack the handed-out message, flush acks, give back held leases."""
        if self._closed:
            return
        self._closed = True
        self._settle_current()
        with contextlib.suppress(Exception):
            await self._release()
        with contextlib.suppress(Exception):
            await _shielded(self._acks.flush())
        with contextlib.suppress(Exception):
            await _shielded(self._claimer.close())
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self._directory.news.unsubscribe(self._wake)

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
        self._free_place()
        return lease

    def _settle_current(self) -> None:
        if self._current is not None:
            self._acks.add(self._current[0], self.clock.now())
            self._current = None
            self._free_place()

    def _free_place(self) -> None:
        """The handed-out message is settled: its place in flight (a concurrency
        limit) is to be freed, for every reader (`_release`: one store update)."""
        if self._place is not None:
            self._freeing.append(self._place)
            self._place = None

    async def _release(self) -> None:
        """Free the places of the messages settled (before claiming: so that this
        reader, now free, can take the place itself)."""
        freeing, self._freeing = self._freeing, []
        for destination, place in freeing:
            try:
                await _shielded(self.valve.settle(destination, [place]))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the place lapses with its lease: slower, not over
                log.warning("could not free a place in flight of %s: %s", destination, exc)
                continue
            # this reader, free now, may take the place itself at once; the others
            # (here and elsewhere) try again at their own pace
            self._claimer.next_try.pop(destination, None)

    def _measure_pace(self) -> None:
        """The consumer's time per message (between a return of next() and the next
        call), averaged: a reader takes no more of a throttled destination's rows
        than its consumer gets through in a moment (tuning.GROUP_SPAN)."""
        if self._current is not None and self._returned:
            spent = time.monotonic() - self._returned
            pace = self._claimer.pace
            self._claimer.pace = spent if pace <= 0 else 0.8 * pace + 0.2 * spent

    async def _take(self, deadline: float | None) -> Slot | None:
        """The next held slot that is due, claiming more when none is; None when
        there is nothing to hand out now."""
        now = self.clock.now()
        if self._acks.due(now):
            await self._flush(deadline)
        slot, _, stale = self._held.take(now, self.lease * 0.8)
        if stale:
            log.warning("giving back %d held leases near their expiry", len(stale))
            await self._claimer.give_back(stale)
        if slot is not None:
            return slot
        if self._held.due(now + self.valve.lead) >= self.batch:
            return None  # enough in hand: what is held comes due in a moment
        # busy (the last claim found rows): look for new rows often; else as when idle
        await self._refresh(now, SCAN_BUSY if self._busy_claims else self.idle_interval, deadline)
        for _ in range(ROUNDS):
            # a destination that came back short leaves the line: try the next ones;
            # slots granted a moment ahead leave room in the batch for others due now
            added = await self._claimer.round(now, deadline)
            self._busy_claims = added > 0
            now = self.clock.now()
            slot, _, _ = self._held.take(now, self.lease * 0.8)
            if slot is not None:
                return slot
            if not self._claimer.short and not added:
                return None
            if self._held.due(now + self.valve.lead) >= self.batch:
                return None
        return None

    async def _idle(self, deadline: float | None, bound: float | None) -> bool:
        """Wait until something may be claimable or a held slot comes due. False when
        the deadline passed first."""
        loop = asyncio.get_running_loop()
        await self._flush(bound)
        now = self.clock.now()
        wake = now + self.idle_interval
        held = self._held.next_at()
        if held is not None:
            wake = min(wake, held)
        nxt = self._claimer.next_time(now)
        if nxt is not None:
            wake = min(wake, max(nxt, now))
        wait = max(0.0, wake - now)
        if deadline is not None:
            left = deadline - loop.time()
            if left <= 0:
                return False
            wait = min(wait, left)
        self._wake.clear()
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
        await self._refresh(self.clock.now(), self.idle_interval, bound)
        return True

    async def _flush(self, bound: float | None) -> None:
        """The pending acks, by `bound` (loop time): cut off, they are kept."""
        try:
            async with asyncio.timeout_at(bound):
                await self._acks.flush()
        except TimeoutError:
            raise QueueUnavailable("the queue did not answer an ack in time") from None

    async def _refresh(self, now: float, max_age: float, bound: float | None) -> None:
        """The directory's scan, by `bound` (loop time)."""
        try:
            async with asyncio.timeout_at(bound):
                await self._directory.refresh(now, max_age)
        except TimeoutError:
            raise QueueUnavailable("the queue did not answer a scan in time") from None

    async def _process(self, slot: Slot, deadline: float | None) -> Message | None:
        try:
            return await self._handout.process(slot, deadline)
        except asyncio.CancelledError:
            # Any queue operation may or may not have committed: give the row back
            # under its lease token (a no-op if it moved), never hand it out again.
            self._spawn(self._claimer.give_back([slot]))
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
