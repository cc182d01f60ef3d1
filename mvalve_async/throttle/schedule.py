"""The valve's one mechanism, as pure functions over one destination's record.

The promise of `Rate(n, per)`: a destination receives at most `n` messages in any
half-open window of `per` seconds, counted over every reader of every process,
emergencies excepted, on the shared clock (clock.py). For a non-decreasing log of
hand-out times, `x[k] >= x[k-n] + per` for every k is exactly that promise (a
sliding log; plain GCRA with a burst of n would let 2n - 1 through some windows).

The valve decides *before* rows are leased. Per destination the store keeps one
small record, updated atomically (`Store.update`):

    sent        recent hand-outs, non-decreasing, each an upper bound of its true
                time (see "Entries"); at least the last `rate.keep` are kept
    busy        a duration keeps the destination busy until then
    paused      nothing but emergencies before this (`Reader.pause`)
    emergency   end of the emergency window opened by an emergency message
    hold        the reader that may lease the destination's rows now ("": none)
    hold_until  ... until then at the latest (its leases are given up by then)
    hold_last   its last slot: other readers need not ask before then
    inflight    messages handed out and not settled yet, as [until, id] (a
                concurrency limit: at most `limit` of them; each lapses at its
                `until`, when its lease has ended)
    limit       the concurrency limit the last grant applied (0: none), for stats

`grant` checks a destination out for one reader: up to `want` slot times, the first
ones now and the rest at most `lead` ahead, recorded in the log, and the hold. The
reader leases as many of the destination's oldest rows as it got slots and hands
them out in order, each at its slot (never before, at most `margin` after). No
other reader leases the destination's rows until the holder checks in, so its
messages leave in insertion order whatever the number of readers, and nothing is
moved to throttle it: rows without a slot stay where they are. `checkin` releases
the hold and corrects the log: slots that were not used leave it, and a hand-out
later than its margin replaces its slot's entry with the actual time (later: never
looser).

Entries: slot t is recorded as t + slack (slack = margin + the clock's error bound),
the latest true time at which it can be handed out; a slot is granted at t only if
t - error >= log[-n] + per. So two recorded hand-outs with n - 1 others between
them are at least `per` apart in true time, whichever readers made them. A paced
rate keeps only the last entry and spaces slots so that any n + 1 in a row span as
much (`_floor`).

Trimming: a grant trims the log to the last `keep` entries *before* appending its
own, and only the holder's checkin trims after removing unused ones: removing a
slot must never bring back a window that an entry dropped too early would close.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson

from ..errors import CodecError
from ..tuning import FULL_RETRY, HELD_RETRY, RECORD_MARGIN
from .rate import EmergencyPolicy, Rate

__all__ = [
    "VERSION",
    "Grant",
    "Record",
    "checkin",
    "emergency",
    "grant",
    "lifetime",
    "pause",
    "resume",
    "settle",
    "state",
]

# Compatibility surface: store records are shared across processes and versions
# (`Record.dumps`: a JSON list led by VERSION, then the fields in that order).
# Changing the layout needs a VERSION bump, and `Record.loads` reading the old ones.
VERSION = 4


def _r(t: float) -> float:
    return round(t, 6)


def _after(t: float, delta: float) -> float:
    """The first time on the microsecond grid (where the logs live) at least `delta`
    after `t`: a `per` or `per / n` off the grid (1/3 s, 0.7 s / 206) rounded to the
    nearest microsecond would let n + 1 slots into a window a few microseconds short.
    Float noise of 1e-6 µs is not rounded up."""
    return (round(t * 1e6) + math.ceil(delta * 1e6 - 1e-6)) / 1e6


@dataclass(slots=True)
class Record:
    sent: list[float] = field(default_factory=list)
    busy: float = 0.0
    paused: float = 0.0
    emergency: float = 0.0
    hold: str = ""
    hold_until: float = 0.0
    hold_last: float = 0.0
    inflight: list[list[float | str]] = field(default_factory=list)
    limit: int = 0

    def dumps(self) -> bytes:
        return orjson.dumps(
            [VERSION, self.sent, self.busy, self.paused, self.emergency, self.hold,
             self.hold_until, self.hold_last, self.inflight, self.limit]
        )  # fmt: skip

    def live(self, now: float) -> int:
        """Messages in flight now (their `until` not passed)."""
        return sum(1 for until, _ in self.inflight if float(until) > now)

    @classmethod
    def loads(cls, raw: bytes | None) -> Record:
        """A record of this version, or of 1-3 (the claim-then-move valve of 0.1: its
        hand-outs, durations, pauses and emergency windows carry over; its slot
        reservations went with the moved rows, which drain as timed rows)."""
        if raw is None:
            return cls()
        try:
            data = orjson.loads(raw)
            if not isinstance(data, list) or not data or type(data[0]) is not int:
                raise ValueError("not a versioned list")
            if data[0] == VERSION:
                _, sent, busy, paused, emergency, hold, until, last, inflight, limit = data
                if not isinstance(hold, str):
                    raise ValueError(f"hold {hold!r} is not a string")
                if type(limit) is not int or limit < 0:
                    raise ValueError(f"limit {limit!r} is not a count")
                return cls(_log(sent), _num(busy), _num(paused), _num(emergency), hold,
                           _num(until), _num(last), _inflight(inflight), limit)  # fmt: skip
            if data[0] in (1, 2, 3) and len(data) == data[0] + 7:
                _, _slots, sent, busy, _horizon, paused, emergency, *_ = data
                return cls(_log(sent), _num(busy), _num(paused), _num(emergency))
            raise ValueError(f"version {data[0]!r}")
        except (ValueError, TypeError) as exc:
            raise CodecError(f"schedule record is not valid: {exc}") from None


def _num(x: object) -> float:
    if type(x) not in (int, float) or not math.isfinite(x):  # type: ignore[arg-type]
        raise ValueError(f"{x!r} is not a finite number")
    return float(x)  # type: ignore[arg-type]


def _inflight(items: object) -> list[list[float | str]]:
    if not isinstance(items, list):
        raise ValueError(f"{items!r} is not a list")
    out: list[list[float | str]] = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], str)):
            raise ValueError(f"{item!r} is not [until, id]")
        out.append([_num(item[0]), item[1]])
    return out


def _log(items: object) -> list[float]:
    if not isinstance(items, list):
        raise ValueError(f"{items!r} is not a list")
    return sorted(_num(x) for x in items)


@dataclass(frozen=True, slots=True)
class Grant:
    """What a checkout gave: `slots` (hand-out times, non-decreasing; empty: none)
    and their log `entries` (for `checkin`); with no slots, `next_try` says when to
    ask again. `drop`: an emergency window with policy DROP is open: the
    destination's messages claimed now go to the dead letters. `held`: another
    reader holds the destination (its rate, a pause or a window may not)."""

    slots: tuple[float, ...] = ()
    entries: tuple[float, ...] = ()
    next_try: float = 0.0
    drop: bool = False
    held: bool = False
    inflight: tuple[str, ...] = ()  # the in-flight ids taken, one per slot (a limit)


def _floor(log: Sequence[float], rate: Rate | None, error: float, slack: float) -> float:
    """Earliest slot the log allows next (0: no constraint).

    Paced: slots (entry - slack) are spaced (per + slack + error) / n apart, so any
    n + 1 consecutive hand-outs span at least per + slack + error between their
    first slot and their last, of which a hand-out's lateness and two clocks' errors
    (margin + 2 error = slack + error) take at most that much: per on true time. The
    margin and the errors are paid once per window, as for a burst rate, not once per
    slot (Rate(1000, 1) with a 10 ms margin: 990 per second, not 91)."""
    if rate is None or not log:
        return 0.0
    if rate.paced:
        return _after(log[-1], (rate.per + slack + error) / rate.n - slack)
    if len(log) >= rate.n:
        return _after(log[-rate.n], rate.per + error)
    return 0.0


def grant(
    rec: Record,
    now: float,
    rate: Rate | None,
    *,
    want: int,
    token: str,
    until: float,
    slack: float = 0.0,
    error: float = 0.0,
    lead: float = 1.0,
    policy: EmergencyPolicy = EmergencyPolicy.DROP,
    limit: int | None = None,
) -> Grant:
    """Check the destination out for `token` (see the module docstring); updates
    `rec` in place when anything is granted. `until`: the hold's end at the latest.
    `limit`: at most that many messages in flight (handed out, not settled): each
    slot granted takes one, given back by `settle` (or `checkin` when unused), and
    lapses at `until` (a dead reader's leases have ended by then)."""
    if rec.hold and rec.hold != token and rec.hold_until > now:
        # the holder hands its slots out and checks in: not before its last slot
        wait = min(rec.hold_until, max(now + HELD_RETRY, rec.hold_last))
        return Grant(next_try=wait, held=True)
    if policy is EmergencyPolicy.DROP and now < rec.emergency:
        return Grant(next_try=now, drop=True)
    window = max(rec.paused, rec.emergency if policy is EmergencyPolicy.HOLD else 0.0)
    if now < window:
        return Grant(next_try=window)
    if limit is not None:
        rec.inflight = [e for e in rec.inflight if float(e[0]) > now]
        rec.limit = limit
        free = limit - len(rec.inflight)
        if free <= 0:  # until one is settled, or its lease ends
            soonest = min(float(e[0]) for e in rec.inflight)
            return Grant(next_try=min(soonest, now + FULL_RETRY), held=True)
        want = min(want, free)
    log = list(rec.sent)
    if rate is not None:
        del log[: -rate.keep]
    slots: list[float] = []
    entries: list[float] = []
    t = now
    while len(slots) < max(0, want):
        t = _r(max(now, _floor(log, rate, error, slack), rec.busy + error if rec.busy else 0.0))
        if t > now + lead:
            break
        slots.append(t)
        entries.append(_r(t + slack))
        if rate is not None:
            log.append(entries[-1])
    if not slots:
        return Grant(next_try=max(now, t - lead))
    rec.sent = log
    rec.hold, rec.hold_until, rec.hold_last = token, _r(until), slots[-1]
    ids: tuple[str, ...] = ()
    if limit is not None:
        ids = tuple(f"{token}:{i}" for i in range(len(slots)))
        rec.inflight += [[_r(until), i] for i in ids]
    return Grant(tuple(slots), tuple(entries), now, inflight=ids)


def _remove(log: list[float], entry: float) -> None:
    i = bisect.bisect_left(log, entry)
    if i < len(log) and log[i] == entry:
        del log[i]


def checkin(
    rec: Record,
    token: str,
    rate: Rate | None,
    *,
    unused: Sequence[float] = (),
    late: Sequence[tuple[float, float]] = (),
    busy: float = 0.0,
    freed: Sequence[str] = (),
) -> None:
    """End `token`'s hold. `unused`: entries of slots whose messages were not handed
    out; `late`: (entry, actual) for hand-outs later than their margin (`actual` is
    the upper bound of the true time); `busy`: the end of a duration begun."""
    mine = rec.hold == token
    if mine:
        rec.hold, rec.hold_until, rec.hold_last = "", 0.0, 0.0
    log = list(rec.sent)
    for entry in unused:
        _remove(log, entry)
    for entry, actual in late:
        _remove(log, entry)
        bisect.insort(log, _r(actual))
    if mine and rate is not None:
        del log[: -rate.keep]
    rec.sent = log
    if busy:
        rec.busy = max(rec.busy, _r(busy))
    if freed:
        settle(rec, freed)


def settle(rec: Record, ids: Sequence[str]) -> None:
    """Messages (their in-flight ids) were settled, or never handed out: their places
    in flight are free."""
    gone = set(ids)
    rec.inflight = [e for e in rec.inflight if e[1] not in gone]


def emergency(
    rec: Record,
    now: float,
    rate: Rate | None,
    *,
    duration: float | None,
    policy: EmergencyPolicy,
    slack: float = 0.0,
) -> float:
    """An emergency message goes out now, past the rate; it counts in the log (later
    messages wait for it) and, unless the policy is IGNORE, opens the emergency
    window: its duration, or the rate's period. Returns the window's end (0: none)."""
    if rate is not None:
        bisect.insort(rec.sent, _r(now + slack))  # no trim: a holder may have entries
    if duration:
        rec.busy = max(rec.busy, _r(now + slack + duration))
    if policy is EmergencyPolicy.IGNORE:
        return 0.0
    # On the microsecond grid, like a hold to it: off the grid it could round down
    # and let a message through a microsecond before the window ends.
    rec.emergency = max(rec.emergency, _after(now, duration or (rate.per if rate else 1.0)))
    return rec.emergency


def state(rec: Record, now: float, policy: EmergencyPolicy) -> tuple[float, bool]:
    """For a destination without a rate (no hold, no log): (nothing before, drop).
    `drop`: an emergency window with policy DROP is open."""
    if policy is EmergencyPolicy.DROP and now < rec.emergency:
        return now, True
    until = max(rec.paused, rec.busy, rec.emergency if policy is EmergencyPolicy.HOLD else 0.0)
    return (until if until > now else 0.0), False


def pause(rec: Record, now: float, seconds: float) -> float:
    """Nothing but emergencies is handed out before now + seconds; returns that end."""
    rec.paused = max(rec.paused, _after(now, seconds))
    return rec.paused


def resume(rec: Record) -> None:
    rec.paused = 0.0


def lifetime(rec: Record, now: float, rate: Rate | None, *, margin: float = RECORD_MARGIN) -> float:
    """Seconds the record must live: until its last hand-out has left every window,
    and past every duration, pause, emergency window and hold it holds; plus
    `margin`."""
    ends = [rec.busy, rec.paused, rec.emergency, rec.hold_until]
    ends += [float(e[0]) for e in rec.inflight]
    if rec.sent and rate is not None:
        ends.append(rec.sent[-1] + rate.per)
    return max(0.0, max(ends) - now) + margin
