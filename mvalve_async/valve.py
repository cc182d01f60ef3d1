"""The valve: per-destination decisions through the shared store.

Pure scheduling lives in schedule.py; this module binds it to a `Store`
(atomic record updates, retried with back-off while the store is down: the
valve never lets a message through unthrottled).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Mapping

import orjson

from .errors import CodecError, StoreError
from .interfaces import Store
from .schedule import (
    MAX_LEAD,
    Action,
    Decision,
    EmergencyPolicy,
    Rate,
    Record,
    admit,
    claimed,
    forget,
)
from .schedule import pause as _pause
from .schedule import resume as _resume

__all__ = ["Valve"]

log = logging.getLogger(__name__)


# Records must outlive every slot they hold: a day covers any backlog this library
# is meant for, and stays under memcached's 30-day "absolute time" threshold.
RECORD_TTL = 86400


# The record of a destination nothing constrains (no rate, pause, emergency window,
# duration or order hint): an unthrottled message there goes at once and changes
# nothing. That is what `admit` decides; the valve skips decoding and re-encoding.
UNTOUCHED = Record().dumps()

EPOCH_KEY = "epoch"
_EPOCHS: weakref.WeakKeyDictionary[Store, dict[str, float]] = weakref.WeakKeyDictionary()


def key_for(destination: str) -> str:
    return "d:" + destination


class Valve:
    def __init__(
        self,
        store: Store,
        *,
        rate: Rate | None = None,
        rates: Mapping[str, Rate | None] | None = None,
        policy: EmergencyPolicy | str = EmergencyPolicy.DROP,
        fifo_grace: float = 1.0,
        retry_max: float = 2.0,
        margin: float | None = None,
        fallback: Store | None = None,
    ) -> None:
        """`fallback`: a local store (e.g. `MemoryStore()`) used while `store` is
        unreachable, instead of waiting. Opt-in: the rate then holds per process only."""
        self.store = store
        self.fallback = fallback
        self._on_fallback = False
        self.rate = rate
        self.rates = dict(rates or {})
        self.policy = EmergencyPolicy(policy)
        self.fifo_grace = fifo_grace
        self.retry_max = retry_max
        self.margin = margin
        # epoch record key -> the epoch seen, shared by every valve of this store: a
        # reader created after a memcached restart must know an epoch was seen before
        self._epochs = _EPOCHS.setdefault(store, {})

    def rate_for(self, destination: str) -> Rate | None:
        return self.rates.get(destination, self.rate)

    async def decide(
        self,
        destination: str,
        *,
        duration: float | None,
        emergency: bool,
        reserved: bool,
        deadline: float | None = None,
        seq: int = 0,
        force: bool = False,
        retime: float | None = None,
    ) -> Decision | None:
        """One atomic admission. While the store is unreachable, waits and retries
        (logged); returns None if `deadline` (loop time) passes first. `retime`: the
        message was let through for that time but is handed out only now; its
        hand-out moves to the earliest time the rate allows from now."""
        rate = self.rate_for(destination)
        policy, grace = self.policy, self.fifo_grace
        margin = self.margin_for(rate)
        fresh: list[float] = []  # set once the epoch was checked: a new record's start
        plain = rate is None and not (duration or emergency or reserved or retime)

        def step(raw: bytes | None) -> tuple[bytes | None, Decision | None]:
            if plain and raw == UNTOUCHED:
                return None, Decision(Action.DELIVER, round(time.time(), 6))
            if raw is None and not fresh:
                return None, None  # a missing record: check the epoch first
            rec = Record.loads(raw) if raw is not None else Record(busy=fresh[0])
            if retime is not None:
                forget(rec, retime)
            decision = admit(
                rec, time.time(), rate, duration=duration, emergency=emergency,
                reserved=reserved or retime is not None, policy=policy, fifo_grace=grace,
                margin=margin, seq=None if retime is not None else seq or None, force=force,
            )  # fmt: skip
            new = rec.dumps()
            return (None if new == raw else new), decision  # unchanged: no write

        loop = asyncio.get_running_loop()
        delay = 0.05
        while True:
            try:
                if not fresh and self._epoch_key(destination) not in self._epochs:
                    # Learn the epoch at the first decision, not at the first miss: a
                    # process that only ever found records present would otherwise
                    # take a restarted epoch for the first one and see no loss.
                    fresh[:] = [await self._quarantine(destination)]
                decision = await self.store.update(key_for(destination), step, ttl=RECORD_TTL)
                if self._on_fallback:
                    self._on_fallback = False
                    log.warning("state store is back: the rate is shared again")
                if decision is not None:
                    return decision
                fresh[:] = [await self._quarantine(destination)]
                continue
            except StoreError as exc:
                if self.fallback is not None:
                    if not self._on_fallback:
                        self._on_fallback = True
                        log.warning(
                            "state store unavailable (%s): using the local fallback, the "
                            "rate holds per process until it is back", exc,
                        )  # fmt: skip
                    fresh[:] = fresh or [0.0]  # a local record needs no epoch check
                    return await self.fallback.update(key_for(destination), step, RECORD_TTL)
                log.warning(
                    "state store unavailable (%s); retrying in %.2fs", exc, delay,
                    extra={"destination": destination},
                )  # fmt: skip
                if deadline is not None and loop.time() + delay > deadline:
                    return None
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max)

    async def claimed(self, destination: str, seqs: list[int]) -> None:
        """Tell the other readers that this one holds these messages (by seq) of a
        throttled destination, so that their younger ones wait instead of
        overtaking. A hint for order only: one try, and a store error just loses it."""
        if not seqs or self.rate_for(destination) is None:
            return
        now = time.time()
        fresh: list[float] = []

        def step(raw: bytes | None) -> tuple[bytes | None, bool]:
            if raw is None and not fresh:
                return None, False  # a missing record: check the epoch first
            rec = Record.loads(raw) if raw is not None else Record(busy=fresh[0])
            return (rec.dumps() if claimed(rec, now, seqs) else None), True

        try:
            if self._epoch_key(destination) not in self._epochs:
                fresh[:] = [await self._quarantine(destination)]
            if not await self.store.update(key_for(destination), step, ttl=RECORD_TTL):
                fresh[:] = [await self._quarantine(destination)]
                await self.store.update(key_for(destination), step, ttl=RECORD_TTL)
        except (StoreError, CodecError) as exc:
            log.debug("order hint for %s lost: %s", destination, exc)

    async def _quarantine(self, destination: str) -> float:
        """A destination's record is missing: a new destination, or lost state (a
        memcached restart or eviction)? The store's epoch record tells: it is
        created once, so finding it missing (or different) after this process saw
        it means the schedule was lost. Fresh records then deliver nothing before
        `epoch + per + MAX_LEAD`: every window holding a forgotten hand-out (which may
        be scheduled up to MAX_LEAD after the loss) has ended by then.
        Wastes up to `per + MAX_LEAD` seconds of slots after a loss; never grants one."""
        now = time.time()
        epoch_key = self._epoch_key(destination)
        seen = self._epochs.get(epoch_key)
        payload = orjson.dumps([now, seen is not None])

        def fn(raw: bytes | None) -> tuple[bytes | None, bytes]:
            return (payload, payload) if raw is None else (None, raw)

        raw = await self.store.update(epoch_key, fn, ttl=0)
        try:
            created, lost = orjson.loads(raw)
            created = float(created)
        except (ValueError, TypeError):
            created, lost = now, True
        self._epochs[epoch_key] = created
        if lost or (seen is not None and seen != created):
            # a forgotten hand-out may be scheduled up to MAX_LEAD after the loss
            until = created + self.max_per() + MAX_LEAD
            if until > now:
                log.warning("schedule state was lost; fresh destinations wait %.2fs", until - now)
                return until
        return 0.0

    def _epoch_key(self, destination: str) -> str:
        """One epoch per memcached server, on the server of the destination's record."""
        colocated = getattr(self.store, "colocated", None)
        return colocated(EPOCH_KEY, key_for(destination)) if colocated else EPOCH_KEY

    def margin_for(self, rate: Rate | None) -> float:
        """Default: 1 % of the period, at most 10 ms (scheduling lag of a busy reader)."""
        if rate is None:
            return 0.0
        return self.margin if self.margin is not None else min(0.01, rate.per * 0.01)

    def max_per(self) -> float:
        pers = [r.per for r in [self.rate, *self.rates.values()] if r is not None]
        return max(pers, default=1.0)

    async def pause(self, destination: str, seconds: float) -> tuple[float, float]:
        """Returns (now, shift): reserved rows due after `now` must move `shift` later."""
        now = time.time()

        def fn(raw: bytes | None) -> tuple[bytes | None, float]:
            rec = Record.loads(raw)
            shift = _pause(rec, now, seconds)
            return rec.dumps(), shift

        return now, await self.store.update(key_for(destination), fn, ttl=RECORD_TTL)

    async def resume(self, destination: str) -> None:
        def fn(raw: bytes | None) -> tuple[bytes | None, None]:
            rec = Record.loads(raw)
            _resume(rec)
            return rec.dumps(), None

        await self.store.update(key_for(destination), fn, ttl=RECORD_TTL)

    async def record(self, destination: str) -> Record:
        return Record.loads(await self.store.get(key_for(destination)))
