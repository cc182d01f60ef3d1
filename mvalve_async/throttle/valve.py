"""The valve: schedule.py's decisions, made atomically through the shared store.

Every call is one atomic update (or read) of one destination's record, on the
queue's shared clock. While the store cannot be reached the valve waits and
retries (logged) until the caller's deadline, and then answers None: it never
lets a message through unthrottled, unless the reader opted into a local
`fallback` store (the rate then holds per process only, until the store is back).
A store call never outlives the caller's deadline.

Lost state: a destination's record that is missing may be new, or forgotten (a
memcached restart or eviction). The store's epoch record tells: it is created once,
so finding it missing (or different) after this process saw it means the schedule
was lost; fresh records then deliver nothing for a window (`_quarantine`).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

import orjson

from ..clock import Clock
from ..errors import CodecError, StoreError
from ..interfaces import Store
from . import schedule
from .rate import EmergencyPolicy, Rate
from .schedule import Grant, Record

__all__ = ["Valve", "key_for"]

log = logging.getLogger(__name__)
R = TypeVar("R")

EPOCH_KEY = "epoch"
_EPOCHS: weakref.WeakKeyDictionary[Store, dict[str, float]] = weakref.WeakKeyDictionary()
# How far ahead of now a slot is granted (the holder keeps the row aside until then):
# a moment, so that a row is at hand when its slot comes, not so long that rows
# and holds sit idle (a burst's next window is a whole period away). A paced rate
# gets up to PACED_SLOTS of its slots at once (at most MAX_LEAD ahead).
LEAD = 0.05
PACED_SLOTS = 4
MAX_LEAD = 1.0
# One store call (with its optimistic retries) may take this long at most.
CALL_TIMEOUT = 2.0


def key_for(destination: str) -> str:
    return "d:" + destination


class Valve:
    """Per-destination decisions for one reader configuration (see the module doc).

    `margin` (seconds) is how late after its slot a message may be handed out
    without correcting the log (default 1 % of the period, at most 10 ms); the
    window is widened by it, and by the clock's error bound."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        rate: Rate | None = None,
        rates: Mapping[str, Rate | None] | None = None,
        policy: EmergencyPolicy | str = EmergencyPolicy.DROP,
        margin: float | None = None,
        lead: float = LEAD,
        retry_max: float = 2.0,
        fallback: Store | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.rate = rate
        self.rates = dict(rates or {})
        self.policy = EmergencyPolicy(policy)
        self.margin = margin
        self.lead = lead
        self.retry_max = retry_max
        self.fallback = fallback
        self._on_fallback = False
        # epoch record key -> the epoch seen, shared by every valve of this store: a
        # reader created after a memcached restart must know an epoch was seen before
        self._epochs = _EPOCHS.setdefault(store, {})

    # -- configuration ----------------------------------------------------------

    def rate_for(self, destination: str) -> Rate | None:
        return self.rates.get(destination, self.rate)

    def governed(self, destination: str) -> bool:
        """Does this destination go through checkouts (it has a rate)?"""
        return self.rates.get(destination, self.rate) is not None

    def margin_for(self, rate: Rate | None) -> float:
        """Default: 1 % of the period, at most 10 ms (scheduling lag of a busy reader)."""
        if rate is None:
            return 0.0
        return self.margin if self.margin is not None else min(0.01, rate.per * 0.01)

    def lead_for(self, rate: Rate | None) -> float:
        """How far ahead slots are granted for `rate` (see LEAD)."""
        if rate is None or not rate.paced:
            return self.lead
        return max(self.lead, min(MAX_LEAD, PACED_SLOTS * rate.spacing))

    def max_per(self) -> float:
        pers = [r.per for r in [self.rate, *self.rates.values()] if r is not None]
        return max(pers, default=1.0)

    # -- decisions ----------------------------------------------------------------

    async def checkout(
        self, destination: str, want: int, token: str, until: float, deadline: float | None
    ) -> Grant | None:
        """Up to `want` slots for `destination`, held for `token` until `until` at the
        latest (schedule.grant). None: the store stayed unreachable past `deadline`
        (loop time)."""
        rate = self.rate_for(destination)
        margin = self.margin_for(rate)
        policy, lead, clock = self.policy, self.lead_for(rate), self.clock

        def step(rec: Record, now: float) -> Grant:
            error = clock.error
            return schedule.grant(
                rec, now, rate, want=want, token=token, until=until, slack=margin + error,
                error=error, lead=lead, policy=policy,
            )  # fmt: skip

        return await self._decide(destination, rate, step, deadline)

    async def checkin(
        self,
        destination: str,
        token: str,
        *,
        unused: Sequence[float] = (),
        late: Sequence[tuple[float, float]] = (),
        busy: float = 0.0,
    ) -> None:
        """End a hold (schedule.checkin). Tries for CALL_TIMEOUT; if the store stays
        away the hold ends by itself at its `until` and unused slots stay counted
        (slots wasted, never granted)."""
        rate = self.rate_for(destination)

        def step(rec: Record, now: float) -> None:
            schedule.checkin(rec, token, rate, unused=unused, late=late, busy=busy)

        loop = asyncio.get_running_loop()
        await self._decide(destination, rate, step, loop.time() + CALL_TIMEOUT, fresh=0.0)

    async def emergency(
        self, destination: str, duration: float | None, deadline: float | None
    ) -> float | None:
        """Record an emergency hand-out now; returns its window's end (0: none), or
        None when the store stayed unreachable past `deadline`."""
        rate = self.rate_for(destination)
        slack = self.margin_for(rate) + self.clock.error
        policy = self.policy

        def step(rec: Record, now: float) -> float:
            return schedule.emergency(rec, now, rate, duration=duration, policy=policy, slack=slack)

        return await self._decide(destination, rate, step, deadline, fresh=0.0)

    async def busy(self, destination: str, until: float) -> None:
        """A duration began on a destination without a rate: nothing before `until`."""

        def step(rec: Record, now: float) -> None:
            rec.busy = max(rec.busy, round(until, 6))

        loop = asyncio.get_running_loop()
        await self._decide(destination, None, step, loop.time() + CALL_TIMEOUT, fresh=0.0)

    async def states(
        self, destinations: Sequence[str], deadline: float | None
    ) -> dict[str, tuple[float, bool]] | None:
        """(nothing before, drop) per destination without a rate (schedule.state), in
        one round trip per store server; destinations nothing holds back are left out.
        None: the store stayed unreachable past `deadline`."""
        keys = {key_for(d): d for d in destinations}

        async def read(store: Store) -> dict[str, bytes]:
            return await store.get_many(list(keys))

        found = await self._read(read, deadline)
        if found is None:
            return None
        now, out = self.clock.now(), {}
        for key, raw in found.items():
            try:
                until, drop = schedule.state(Record.loads(raw), now, self.policy)
            except CodecError as exc:
                log.warning("schedule record of %s is unreadable (%s): held", keys[key], exc)
                until, drop = now + self.max_per(), False
            if until or drop:
                out[keys[key]] = (until, drop)
        return out

    async def peek(self, destination: str, deadline: float | None) -> tuple[float, bool] | None:
        """(nothing before, drop) of one destination: is it paused, busy or in an
        emergency window now? None: store unreachable past `deadline`."""
        found = await self.states([destination], deadline)
        return None if found is None else found.get(destination, (0.0, False))

    async def pause(self, destination: str, seconds: float) -> float:
        """Deliver nothing to `destination` before now + seconds; returns that end."""

        def step(rec: Record, now: float) -> float:
            return schedule.pause(rec, now, seconds)

        result = await self._decide(destination, None, step, None, fresh=0.0)
        assert result is not None
        return result

    async def resume(self, destination: str) -> None:
        def step(rec: Record, now: float) -> None:
            schedule.resume(rec)

        await self._decide(destination, None, step, None, fresh=0.0)

    async def record(self, destination: str) -> Record:
        return Record.loads(await self.store.get(key_for(destination)))

    # -- the store ----------------------------------------------------------------

    async def _decide(
        self,
        destination: str,
        rate: Rate | None,
        step: Callable[[Record, float], R],
        deadline: float | None,
        *,
        fresh: float | None = None,
    ) -> R | None:
        """`step(record, now)` applied atomically to the destination's record (written
        back when it changed, to live as long as it remembers: schedule.lifetime).
        A missing record starts with `busy = fresh` (None: as `_quarantine` says)."""
        key = key_for(destination)
        clock = self.clock
        start: list[float] = [] if fresh is None else [fresh]
        ttl: list[float] = [0.0]

        def fn(raw: bytes | None) -> tuple[bytes | None, tuple[bool, R | None]]:
            if raw is None and not start:
                return None, (False, None)  # a missing record: check the epoch first
            rec = Record.loads(raw) if raw is not None else Record(busy=start[0])
            now = clock.now()
            result = step(rec, now)
            new = rec.dumps()
            ttl[0] = schedule.lifetime(rec, now, rate)
            return (None if new == raw else new), (True, result)

        def lifetime(_new: bytes) -> float:
            return ttl[0]

        async def update(store: Store) -> tuple[bool, R | None]:
            if not start and self._epoch_key(destination) not in self._epochs:
                # Learn the epoch at the first decision, not at the first miss: a
                # process that only ever found records present would otherwise take
                # a restarted epoch for the first one and see no loss.
                start[:] = [await self._quarantine(destination, store)]
            done, result = await store.update(key, fn, ttl=lifetime)
            if not done:
                start[:] = [await self._quarantine(destination, store)]
                done, result = await store.update(key, fn, ttl=lifetime)
            return done, result

        outcome = await self._read(update, deadline, destination)
        if outcome is None:
            return None
        return outcome[1]

    async def _read(
        self,
        call: Callable[[Store], Awaitable[R]],
        deadline: float | None,
        destination: str | None = None,
    ) -> R | None:
        """`call(store)`, retried with back-off while the store is unreachable, never
        past `deadline` (loop time; None: for ever); None when it passed."""
        loop = asyncio.get_running_loop()
        delay = 0.05
        while True:
            left = CALL_TIMEOUT if deadline is None else min(CALL_TIMEOUT, deadline - loop.time())
            try:
                if left <= 0:
                    raise TimeoutError
                async with asyncio.timeout(left):
                    result = await call(self.store)
                if self._on_fallback:
                    self._on_fallback = False
                    log.warning("state store is back: the rate is shared again")
                return result
            except (StoreError, TimeoutError) as exc:
                reason = str(exc) or f"no answer in {max(left, 0):.2f}s"
                if self.fallback is not None:
                    if not self._on_fallback:
                        self._on_fallback = True
                        log.warning(
                            "state store unavailable (%s): using the local fallback, the "
                            "rate holds per process until it is back", reason,
                        )  # fmt: skip
                    return await call(self.fallback)
                if deadline is not None and loop.time() + delay > deadline:
                    log.info("state store unavailable (%s); giving up at the deadline", reason)
                    return None
                log.warning(
                    "state store unavailable (%s); retrying in %.2fs", reason, delay,
                    extra={"destination": destination} if destination else None,
                )  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max)

    async def _quarantine(self, destination: str, store: Store) -> float:
        """A destination's record is missing: a new destination, or lost state (a
        memcached restart or eviction)? The store's epoch record tells: it is
        created once, so finding it missing (or different) after this process saw
        it means the schedule was lost. Fresh records then deliver nothing before
        `epoch + per + lead`: every window holding a forgotten hand-out (which may be
        a slot up to `lead` after the loss) has ended by then.
        Wastes up to `per + lead` seconds of slots after a loss; never grants one."""
        now = self.clock.now()
        epoch_key = self._epoch_key(destination)
        seen = self._epochs.get(epoch_key) if store is self.store else None
        payload = orjson.dumps([now, seen is not None])

        def fn(raw: bytes | None) -> tuple[bytes | None, bytes]:
            return (payload, payload) if raw is None else (None, raw)

        raw = await store.update(epoch_key, fn, ttl=0)
        try:
            created, lost = orjson.loads(raw)
            created = float(created)
        except (ValueError, TypeError):
            created, lost = now, True
        if store is not self.store:  # a local fallback record needs no epoch
            return 0.0
        self._epochs[epoch_key] = created
        if lost or (seen is not None and seen != created):
            until = created + self.max_per() + self.lead
            if until > now:
                log.warning("schedule state was lost; fresh destinations wait %.2fs", until - now)
                return until
        return 0.0

    def _epoch_key(self, destination: str) -> str:
        """One epoch per memcached server, on the server of the destination's record."""
        colocated = getattr(self.store, "colocated", None)
        return colocated(EPOCH_KEY, key_for(destination)) if colocated else EPOCH_KEY
