"""The valve: schedule.py's decisions, made atomically through the shared store.

Every call is one atomic update (or read) of one destination's record, on the
queue's shared clock. While the store cannot be reached the valve waits and
retries (logged) until the caller's deadline, and then answers None: it never
lets a message through unthrottled, unless the reader opted into a local
`fallback` store (the rate then holds per process only, until the store is back).
A store call never outlives the caller's deadline: each is given the earlier of
that deadline and CALL_TIMEOUT as its own `deadline=`, and the store ends it then.

Record lifetimes: a record is written to live as long as what it remembers plus
`record_margin` (schedule.lifetime); a rate whose window the store cannot keep
(`per + record_margin > store.max_ttl`: memcached, 30 days) is refused when the
valve is made.

Lost state: a destination's record that is missing may be new, expired (its
windows are over), or lost (a memcached restart, eviction or flush_all). The valve
asks the store's `health` which, and only then: a present record costs nothing
more. A record found missing by a read that returned at loop time `t` is judged on
a health reading sent after `t` (`since=t`), compared with what this process saw of
that server before (`_Watch`). The server may have lost records by a moment `lost`:

- it started `uptime` seconds ago: its previous incarnation's records were gone by
  then (a restart; also what a brand-new process sees after one);
- its `evictions` or `flush_all` count grew since this process's previous reading
  of it: by the time of this reading;
- this process never read it before and those counts are not zero: by now, as far
  as this process can tell.

The fresh record then starts busy until `lost + per + lead + slack` (the
destination's rate): every window that can hold a hand-out the lost record
remembered has ended by then (a hand-out recorded before the loss is at most
`lead + slack` after it). Slots are wasted, never granted. Cost: nothing per
checkout of a present record; a missing one (on a store that can lose records, for
a destination with a rate) costs one `stats` round trip (shared by the misses of a
claim round that come back together) and one more `gets` before its `add`.

Writes cut off: a checkout or checkin that its deadline cut off may still be
applied later, when the network delivers it (the Store contract). A grant nobody
received would hold the destination for the whole hold (about the lease), a lost
check-in too: the valve remembers both (`_owe`), and its next decision on the
destination undoes the grant or applies the check-in, with a write that makes a
still later one fail.
"""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ..clock import Clock
from ..errors import CodecError, ConfigError, StoreError
from ..interfaces import Store, StoreHealth
from ..tuning import (
    BACKSTOP,
    CALL_TIMEOUT,
    LEAD,
    MAX_LEAD,
    PACED_SLOTS,
    RECORD_MARGIN,
    UPTIME_SLACK,
)
from . import schedule
from .rate import EmergencyPolicy, Rate
from .schedule import Grant, Record

__all__ = ["Valve", "key_for"]

log = logging.getLogger(__name__)
R = TypeVar("R")


def key_for(destination: str) -> str:
    """The store key of a destination's record. Compatibility surface: every reader
    process, of every version running at once, must find the record under this key;
    changing it needs a version bump (old and new readers would keep two records)."""
    return "d:" + destination


class Valve:
    """Per-destination decisions for one reader configuration (see the module doc).

    `margin` (seconds) is how late after its slot a message may be handed out
    without correcting the log (default 1 % of the period, at most 10 ms); the
    window is widened by it, and by the clock's error bound. `record_margin`
    (seconds) is how long a record outlives what it remembers (schedule.lifetime).
    Raises ConfigError when a rate's window is longer than the store keeps records.
    """

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
        record_margin: float = RECORD_MARGIN,
        concurrency: int | None = None,
        concurrencies: Mapping[str, int | None] | None = None,
    ) -> None:
        if not (isinstance(record_margin, int | float) and 0 <= record_margin < math.inf):
            raise ConfigError(f"record_margin must be >= 0 seconds, got {record_margin!r}")
        for who, limit in [("concurrency", concurrency), *(concurrencies or {}).items()]:
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                      or limit < 1):  # fmt: skip
                raise ConfigError(f"a concurrency limit is a count >= 1, got {limit!r} ({who})")
        self.concurrency = concurrency
        self.concurrencies = dict(concurrencies or {})
        self.store = store
        self.clock = clock
        self.rate = rate
        self.rates = dict(rates or {})
        self.policy = EmergencyPolicy(policy)
        self.margin = margin
        self.lead = lead
        self.retry_max = retry_max
        self.fallback = fallback
        self.record_margin = float(record_margin)
        self._on_fallback = False
        # destination -> token -> (repair, keep until): see `_owe`
        self._owed: dict[str, dict[str, tuple[Callable[[Record], None], float]]] = {}
        for s in (store, fallback):
            if s is not None:
                self._check_lifetimes(s)
        # what this process saw of the store's servers, shared by every valve of the
        # store: a reader made later must not take a loss it saw for the first one
        self._watch = _WATCHES.setdefault(store, _Watch())

    def _check_lifetimes(self, store: Store) -> None:
        named = [("every destination", self.rate)] + [
            (f"destination {d!r}", r) for d, r in self.rates.items()
        ]
        for who, rate in named:
            if rate is None or rate.per + self.record_margin <= store.max_ttl:
                continue
            raise ConfigError(
                f"Rate({rate.n}, per={rate.per:g}) for {who}: its window is longer than "
                f"the {store.name} store can keep a destination's record. The record must "
                f"live for the window plus record_margin ({self.record_margin:g} s), "
                f"{rate.per + self.record_margin:g} s, and {store.name} keeps records at "
                f"most {store.max_ttl:g} s ({store.max_ttl / 86400:.2f} days): the record "
                f"would expire inside its window and let extra messages through. Use "
                f"per <= {store.max_ttl - self.record_margin:g} s."
            )

    # -- configuration ----------------------------------------------------------

    def rate_for(self, destination: str) -> Rate | None:
        return self.rates.get(destination, self.rate)

    def limit_for(self, destination: str) -> int | None:
        """The destination's concurrency limit (None: none)."""
        return self.concurrencies.get(destination, self.concurrency)

    def governed(self, destination: str) -> bool:
        """Does this destination go through checkouts (it has a rate or a limit)?"""
        return self.rate_for(destination) is not None or self.limit_for(destination) is not None

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
        (loop time); a grant it may still have written is undone later (`_owe`)."""
        rate = self.rate_for(destination)
        margin = self.margin_for(rate)
        policy, lead, clock = self.policy, self.lead_for(rate), self.clock
        limit = self.limit_for(destination)
        tried: list[Grant] = []  # every grant computed

        def step(rec: Record, now: float) -> Grant:
            error = clock.error
            grant = schedule.grant(
                rec, now, rate, want=want, token=token, until=until, slack=margin + error,
                error=error, lead=lead, policy=policy, limit=limit,
            )  # fmt: skip
            if grant.slots:
                tried.append(grant)
            return grant

        def undo(rec: Record) -> None:
            if rec.hold != token:
                return  # never written, or released: nothing of it to undo
            mine = next((g for g in reversed(tried) if all(x in rec.sent for x in g.entries)), None)
            if mine is not None:
                schedule.checkin(rec, token, rate, unused=mine.entries, freed=mine.inflight)

        grant: Grant | None = None
        try:
            grant = await self._decide(destination, step, deadline)
        finally:
            if tried and (grant is None or not grant.slots):
                self._owe(destination, token, undo, until)
        return grant

    async def checkin(
        self,
        destination: str,
        token: str,
        *,
        unused: Sequence[float] = (),
        late: Sequence[tuple[float, float]] = (),
        busy: float = 0.0,
        freed: Sequence[str] = (),
    ) -> None:
        """End a hold (schedule.checkin); `freed`: the in-flight ids of slots not used.
        Tries for CALL_TIMEOUT; if the store stays away the hold ends by itself at its
        `until` and unused slots stay counted (slots wasted, never granted), and this
        valve's next call on the destination applies it (`_owe`)."""
        rate = self.rate_for(destination)

        def step(rec: Record, now: float) -> bool:
            schedule.checkin(rec, token, rate, unused=unused, late=late, busy=busy, freed=freed)
            return True

        def redo(rec: Record) -> None:
            if rec.hold == token:  # it never landed: all of it
                schedule.checkin(rec, token, rate, unused=unused, late=late, busy=busy, freed=freed)
            else:
                # It may have landed. Removing the unused entries again could remove
                # hand-outs (a burst's slots share one time); moving entries later, the
                # duration and freeing ids are safe to repeat (stricter at worst).
                schedule.checkin(rec, token, rate, late=late, busy=busy, freed=freed)

        loop = asyncio.get_running_loop()
        done: bool | None = None
        try:
            done = await self._decide(destination, step, loop.time() + CALL_TIMEOUT)
        finally:
            if not done:
                keep = self.clock.now() + (rate.per if rate else 0.0) + self.record_margin
                self._owe(destination, token, redo, keep)

    async def settle(self, destination: str, ids: Sequence[str]) -> None:
        """Messages of `destination` (their in-flight ids) were settled: their places
        in flight are free. Tries for CALL_TIMEOUT; else they lapse at their `until`
        (the lease's end): a place held too long, never one granted too many."""
        if not ids:
            return

        def step(rec: Record, now: float) -> bool:
            schedule.settle(rec, ids)
            return True

        loop = asyncio.get_running_loop()
        await self._decide(destination, step, loop.time() + CALL_TIMEOUT)

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

        return await self._decide(destination, step, deadline)

    async def busy(self, destination: str, until: float) -> None:
        """A duration began on a destination without a rate: nothing before `until`."""

        def step(rec: Record, now: float) -> None:
            rec.busy = max(rec.busy, round(until, 6))

        loop = asyncio.get_running_loop()
        await self._decide(destination, step, loop.time() + CALL_TIMEOUT)

    async def states(
        self, destinations: Sequence[str], deadline: float | None
    ) -> dict[str, tuple[float, bool]] | None:
        """(nothing before, drop) per destination without a rate (schedule.state), in
        one round trip per store server; destinations nothing holds back are left out.
        None: the store stayed unreachable past `deadline`."""
        found = await self._get_many(destinations, deadline)
        if found is None:
            return None
        now, out = self.clock.now(), {}
        for destination, raw in found.items():
            try:
                until, drop = schedule.state(Record.loads(raw), now, self.policy)
            except CodecError as exc:
                log.warning("schedule record of %s is unreadable (%s): held", destination, exc)
                until, drop = now + self.max_per(), False
            if until or drop:
                out[destination] = (until, drop)
        return out

    async def peek(self, destination: str, deadline: float | None) -> tuple[float, bool] | None:
        """(nothing before, drop) of one destination: is it paused, busy or in an
        emergency window now? None: store unreachable past `deadline`.

        A destination with a rate is asked this under its holder's hold, which its
        record keeps alive: a missing record then means the record, and the hold
        with it, was lost (a restart, an eviction), and the destination is held
        back (now + its period): the holder's messages go back rather than out
        beside slots granted by a record made afresh."""
        found = await self._get_many([destination], deadline)
        if found is None:
            return None
        now = self.clock.now()
        rate = self.rate_for(destination)
        if destination not in found:
            return (now + rate.per, False) if rate is not None else (0.0, False)
        try:
            return schedule.state(Record.loads(found[destination]), now, self.policy)
        except CodecError as exc:
            log.warning("schedule record of %s is unreadable (%s): held", destination, exc)
            return now + self.max_per(), False

    async def pause(self, destination: str, seconds: float) -> float:
        """Deliver nothing to `destination` before now + seconds; returns that end."""

        def step(rec: Record, now: float) -> float:
            return schedule.pause(rec, now, seconds)

        result = await self._decide(destination, step, None)
        assert result is not None
        return result

    async def resume(self, destination: str) -> None:
        def step(rec: Record, now: float) -> None:
            schedule.resume(rec)

        await self._decide(destination, step, None)

    async def record(self, destination: str) -> Record:
        return Record.loads(await self.store.get(key_for(destination)))

    # -- the store ----------------------------------------------------------------

    async def _get_many(
        self, destinations: Sequence[str], deadline: float | None
    ) -> dict[str, bytes] | None:
        """The records of `destinations` that exist, by destination (one round trip
        per server); None: the store stayed unreachable past `deadline`."""
        keys = {key_for(d): d for d in destinations}

        async def read(store: Store, ends: float | None) -> dict[str, bytes]:
            return await store.get_many(list(keys), deadline=ends)

        found = await self._read(read, deadline)
        return None if found is None else {keys[k]: raw for k, raw in found.items()}

    async def _decide(
        self,
        destination: str,
        step: Callable[[Record, float], R],
        deadline: float | None,
    ) -> R | None:
        """`step(record, now)` applied atomically to the destination's record (written
        back when it changed, to live as long as it remembers: schedule.lifetime).
        A missing record starts afresh, held as `_fresh` says when it may have been
        lost (see the module doc)."""
        key = key_for(destination)
        rate = self.rate_for(destination)
        clock, record_margin = self.clock, self.record_margin
        loop = asyncio.get_running_loop()
        owed = self._owed_now(destination)
        start: list[float] = []  # busy of a fresh record, once known
        read_at = [0.0]  # loop time when the read that found the record missing returned
        ttl = [0.0]

        def fn(raw: bytes | None) -> tuple[bytes | None, tuple[bool, R | None]]:
            if raw is None and not start:
                read_at[0] = loop.time()  # fn runs as soon as the `gets` returned
                return None, (False, None)  # lost or new? ask the store's health first
            rec = Record.loads(raw) if raw is not None else Record(busy=start[0])
            now = clock.now()
            for repair in owed.values():
                repair(rec)
            result = step(rec, now)
            new = rec.dumps()
            ttl[0] = schedule.lifetime(rec, now, rate, margin=record_margin)
            # With repairs, write even an unchanged record: a write that was cut off
            # and still travels (a cas) then finds the record changed and fails.
            return (None if new == raw and not owed else new), (True, result)

        def lifetime(_new: bytes) -> float:
            return ttl[0]

        async def update(store: Store, ends: float | None) -> tuple[bool, R | None]:
            # Each attempt judges its own read: a loss check made for an earlier
            # attempt says nothing about a record found missing later.
            start[:] = [] if rate is not None and store.may_lose_records else [0.0]
            done, result = await store.update(key, fn, ttl=lifetime, deadline=ends)
            if not done:
                # Let the other misses of this claim round (their replies came back
                # together) reach this point too: they share one health reading.
                await asyncio.sleep(0)
                assert rate is not None
                start[:] = [await self._fresh(destination, rate, store, read_at[0], ends)]
                done, result = await store.update(key, fn, ttl=lifetime, deadline=ends)
            return done, result

        outcome = await self._read(update, deadline, destination)
        if outcome is None:
            return None
        self._settle(destination, owed)
        return outcome[1]

    # -- writes that may land late ------------------------------------------------

    def _owe(
        self, destination: str, token: str, repair: Callable[[Record], None], keep: float
    ) -> None:
        """A write for `token` failed (or was cut off) and may still land, or never:
        `repair(record)` makes either right, applied by this valve's next decision on
        the destination, with a write that also makes the late one fail. Kept until
        `keep` (shared clock): by then a hold has ended by itself."""
        now = self.clock.now()
        for d in [d for d, debts in self._owed.items() if all(k < now for _, k in debts.values())]:
            del self._owed[d]
        self._owed.setdefault(destination, {})[token] = (repair, keep)

    def _owed_now(self, destination: str) -> dict[str, Callable[[Record], None]]:
        debts = self._owed.get(destination)
        if not debts:
            return {}
        now = self.clock.now()
        return {token: repair for token, (repair, keep) in debts.items() if keep >= now}

    def _settle(self, destination: str, owed: Mapping[str, Callable[[Record], None]]) -> None:
        debts = self._owed.get(destination)
        if not debts or not owed:
            return
        for token, repair in owed.items():
            if debts.get(token, (None, 0.0))[0] is repair:
                del debts[token]
        if not debts:
            del self._owed[destination]

    async def _fresh(
        self, destination: str, rate: Rate, store: Store, read_at: float, ends: float | None
    ) -> float:
        """The `busy` a fresh record of `destination` starts with: 0, or the end of
        every window that a lost record may have remembered (see the module doc).
        `read_at`: loop time when the read that found no record returned."""
        health = await store.health(key_for(destination), since=read_at, deadline=ends)
        now = self.clock.now()
        lost, why = self._watch.lost_by(health, now)
        slack = self.margin_for(rate) + self.clock.error
        busy = math.ceil((lost + rate.per + self.lead_for(rate) + slack) * 1e6) / 1e6
        if busy <= now:
            return 0.0
        if self._watch.note(health.server, lost):
            log.warning(
                "state store %s may have lost records (%s): a destination whose record "
                "is missing waits until its window is over (%s: %.2f s)",
                health.server, why, destination, busy - now,
            )  # fmt: skip
        return busy

    async def _read(
        self,
        call: Callable[[Store, float | None], Awaitable[R]],
        deadline: float | None,
        destination: str | None = None,
    ) -> R | None:
        """`call(store, ends)`, retried with back-off while the store is unreachable,
        never past `deadline` (loop time; None: for ever); None when it passed. Each
        attempt passes its end (the earlier of `deadline` and CALL_TIMEOUT from now)
        to the store as `deadline=`: the store cuts the call off then, its
        connections left in step."""
        loop = asyncio.get_running_loop()
        delay = 0.05
        while True:
            now = loop.time()
            ends = now + CALL_TIMEOUT if deadline is None else min(now + CALL_TIMEOUT, deadline)
            try:
                if ends <= now:
                    raise TimeoutError
                async with asyncio.timeout_at(ends + BACKSTOP):
                    result = await call(self.store, ends)
                if self._on_fallback:
                    self._on_fallback = False
                    log.warning("state store is back: the rate is shared again")
                return result
            except (StoreError, TimeoutError) as exc:
                reason = str(exc) or f"no answer in {max(ends - now, 0):.2f}s"
                if self.fallback is not None:
                    if not self._on_fallback:
                        self._on_fallback = True
                        log.warning(
                            "state store unavailable (%s): using the local fallback, the "
                            "rate holds per process until it is back", reason,
                        )  # fmt: skip
                    return await call(self.fallback, None)
                if deadline is not None and loop.time() + delay > deadline:
                    log.info("state store unavailable (%s); giving up at the deadline", reason)
                    return None
                log.warning(
                    "state store unavailable (%s); retrying in %.2fs", reason, delay,
                    extra={"destination": destination} if destination else None,
                )  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max)


@dataclass(slots=True)
class _Seen:
    """This process's latest reading of one server, and `lost`: the latest moment
    (shared clock) by which it may have lost records, as far as this process saw."""

    started: float
    pid: int
    evictions: int
    flushes: int
    lost: float
    why: str


class _Watch:
    """What this process saw of each server of one store (one entry per server: the
    latest reading is all the history needed, since `lost` only moves forward)."""

    def __init__(self) -> None:
        self._seen: dict[str, _Seen] = {}
        self._noted: dict[str, float] = {}

    def lost_by(self, health: StoreHealth, now: float) -> tuple[float, str]:
        """(the latest moment by which the server may have lost records, why), from
        `health`, read just before `now` (shared clock), and the readings before it."""
        started = now - health.uptime + UPTIME_SLACK  # this incarnation began by then
        restart = (started, f"started {health.uptime:.0f} s ago")
        seen = self._seen.get(health.server)
        same = seen is not None and (health.started, health.pid) == (seen.started, seen.pid)
        if seen is not None and not same and health.started < seen.started:
            return max((seen.lost, seen.why), restart)  # an older incarnation's reading
        if seen is not None and same:
            if health.evictions < seen.evictions or health.flushes < seen.flushes:
                return max((seen.lost, seen.why), restart)  # a reading overtaken by another
            lost, why = seen.lost, seen.why
            if health.evictions > seen.evictions or health.flushes > seen.flushes:
                lost = now
                why = (
                    f"{health.evictions - seen.evictions} evictions and "
                    f"{health.flushes - seen.flushes} flush_all since this process's "
                    "previous reading"
                )
        elif health.evictions or health.flushes:
            # first seen by this process: when those happened, it cannot tell
            lost = now
            why = (
                f"{health.evictions} evictions and {health.flushes} flush_all since it "
                "started, at times this process cannot tell"
            )
        else:
            lost, why = -math.inf, ""
        self._seen[health.server] = _Seen(
            health.started, health.pid, health.evictions, health.flushes, lost, why
        )
        return max((lost, why), restart)

    def note(self, server: str, lost: float) -> bool:
        """True the first time a loss of `server` is reported (log it once; the
        moment of a restart, from a whole-second uptime, varies by a second)."""
        if lost <= self._noted.get(server, -math.inf) + 1.0:
            return False
        self._noted[server] = lost
        return True


_WATCHES: weakref.WeakKeyDictionary[Store, _Watch] = weakref.WeakKeyDictionary()
