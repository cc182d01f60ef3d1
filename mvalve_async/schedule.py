"""Per-destination schedule: the valve's one mechanism.

`Rate(n, per)` promises that a destination receives at most `n` messages in
any half-open window of `per` seconds, counted over every reader of every
process (emergencies excepted). Per destination the store keeps one small
record, updated atomically (see `Store.update`):

    slots      the last n *reserved* slots (non-decreasing): what admissions
               have promised, including future slots of deferred messages
    sent       the last n *hand-out* times (non-decreasing): the valve's own
               timestamps of deliveries, the times the promise is about
    busy       a message with a duration occupies the destination until then
    horizon    the end of the last reserved duration
    paused     nothing but emergencies before this (`Reader.pause`)
    emergency  end of the emergency window opened by an emergency message
    deferred   the last slot given to a deferred message (keeps FIFO: while a
               backlog drains, new messages queue behind it)

A normal message is admitted at `slot = max(now, constraints)`. If the slot
is now, it is handed out and recorded in both logs. Otherwise the slot is
reserved and the message moves to the timed lane with `ready = slot`; when
due it is handed out without a second rate check, only confirmed against the
hand-out log: if an earlier reserved message was handed out late, the hand-out
waits those few milliseconds, so a late delivery can never bunch with the next.

Plain GCRA with a burst of n lets up to 2n-1 through some windows; a sliding
log of n timestamps cannot: for a non-decreasing sequence, `x[k] >= x[k-n] + per`
for every k is exactly "at most n in any window of `per`".
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import orjson

from ._order import ORDER_WAIT, PENDING_MAX, claimed, older_due, take_older_place
from .errors import CodecError, ConfigError

__all__ = [
    "ORDER_WAIT",
    "PENDING_MAX",
    "Action",
    "Decision",
    "EmergencyPolicy",
    "Rate",
    "Record",
    "admit",
    "claimed",
    "forget",
    "pause",
    "resume",
]

# Above this many messages per window the logs would make the record large:
# such rates are enforced as paced (per/n spacing), which keeps the promise.
MAX_EXACT_LOG = 256


class EmergencyPolicy(enum.StrEnum):
    DROP = "drop"  # other messages during the window go to dead letters ("emergency")
    HOLD = "hold"  # ... are rescheduled to the window's end
    IGNORE = "ignore"  # emergencies open no window


@dataclass(frozen=True, slots=True)
class Rate:
    """At most `n` deliveries in any window of `per` seconds, per destination.

    `pace=True` spaces deliveries `per / n` apart instead of allowing bursts
    (same promise, constant-size state). Rates with `n > 256` are always paced.
    """

    n: int
    per: float = 1.0
    pace: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"Rate n must be a positive integer, got {self.n!r}")
        per = self.per
        if isinstance(per, bool) or not isinstance(per, int | float):
            raise ConfigError(f"Rate per must be a number of seconds, got {per!r}")
        if not math.isfinite(per) or per <= 0:
            raise ConfigError(f"Rate per must be positive and finite, got {per!r}")

    @property
    def paced(self) -> bool:
        return self.pace or self.n > MAX_EXACT_LOG

    @property
    def spacing(self) -> float:
        return self.per / self.n

    @classmethod
    def parse(cls, text: str) -> Rate:
        """'10/1', '10/1s', '2/0.5', '10/1:pace' (used by the CLI)."""
        body, _, flag = text.partition(":")
        n, sep, per = body.partition("/")
        try:
            return cls(int(n), float(per.rstrip("s")) if sep else 1.0, pace=flag == "pace")
        except ValueError:
            raise ConfigError(f"rate {text!r} is not of the form N/SECONDS") from None


class Action(enum.Enum):
    DELIVER = "deliver"  # hand out at `at` (the reader waits if `at` is a few ms ahead)
    DEFER = "defer"  # move to the timed lane with ready = `at`
    DEAD = "dead"  # move to dead letters with `reason`
    WAIT = "wait"  # an older message's slot is due too: ask again at `at` (nothing recorded)


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    at: float
    reserved: bool = False
    reason: str = ""
    shift: float = 0.0  # reserved rows due after `at` move this much later (a window opened)
    # younger deferred rows that give up their slot to this older one: (seq, old, new)
    moves: tuple[tuple[int, float, float], ...] = ()


def _r(t: float) -> float:
    return round(t, 6)


@dataclass(slots=True)
class Record:
    slots: list[float] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)
    busy: float = 0.0
    horizon: float = 0.0
    paused: float = 0.0
    emergency: float = 0.0
    deferred: float = 0.0
    # reservations of deferred messages as [slot, seq] (seq: the row's insertion
    # order, integer µs), to hand an older message a younger one's slot
    pending: list[list[float]] = field(default_factory=list)
    # messages claimed by some reader, not admitted yet, as [claimed at, seq]
    claims: list[list[float]] = field(default_factory=list)

    def dumps(self) -> bytes:
        fields = [self.slots, self.sent, self.busy, self.horizon, self.paused,
                  self.emergency, self.deferred, self.pending]  # fmt: skip
        if self.claims:  # version 3 only when needed: smaller, and v2 readers read it
            return orjson.dumps([3, *fields, self.claims])
        return orjson.dumps([2, *fields])

    @classmethod
    def loads(cls, raw: bytes | None) -> Record:
        if raw is None:
            return cls()
        try:
            v, slots, sent, busy, horizon, paused, emergency, deferred, *rest = orjson.loads(raw)
            if type(v) is not int or v not in (1, 2, 3) or len(rest) != v - 1:
                raise ValueError(f"version {v!r}")
            pending, claims = (
                [[_num(a), _num(b)] for a, b in part] for part in (*rest, [], [])[:2]
            )
            return cls(
                [_num(x) for x in slots], [_num(x) for x in sent], _num(busy),
                _num(horizon), _num(paused), _num(emergency), _num(deferred), pending, claims,
            )  # fmt: skip
        except (ValueError, TypeError) as exc:
            raise CodecError(f"schedule record is not valid: {exc}") from None


def _num(x: object) -> float:
    if type(x) not in (int, float) or not math.isfinite(x):  # type: ignore[arg-type]
        raise ValueError(f"{x!r} is not a finite number")
    return float(x)  # type: ignore[arg-type]


def _window_floor(log: list[float], rate: Rate | None, margin: float = 0.0) -> float:
    """Earliest time the next entry of a non-decreasing log may take; `margin` widens
    the window (paced: spread over the n spacings of a window)."""
    if rate is None or not log:
        return 0.0
    if rate.paced:
        return _after(log[-1], rate.spacing + margin / rate.n)
    if len(log) >= rate.n:
        return _after(log[-rate.n], rate.per + margin)
    return 0.0


def _after(t: float, delta: float) -> float:
    """The first time on the microsecond grid (where the logs live) at least `delta`
    after `t`, in integer microseconds: a `per` or `per / n` off the grid (1/3 s,
    0.7 s / 206) rounded to the nearest microsecond would let n + 1 slots into a
    window a few microseconds short. Float noise of 1e-6 µs is not rounded up."""
    return (round(t * 1e6) + math.ceil(delta * 1e6 - 1e-6)) / 1e6


def _append(log: list[float], t: float, rate: Rate | None) -> None:
    if rate is None:  # unlimited: no window to enforce, the logs stay empty
        return
    if log and t < log[-1]:  # only emergencies arrive out of order
        i = len(log)
        while i and log[i - 1] > t:
            i -= 1
        log.insert(i, t)
    else:
        log.append(t)
    keep = 1 if rate.paced else rate.n
    del log[:-keep]


def admit(
    rec: Record,
    now: float,
    rate: Rate | None,
    *,
    duration: float | None = None,
    emergency: bool = False,
    reserved: bool = False,
    policy: EmergencyPolicy = EmergencyPolicy.DROP,
    fifo_grace: float = 1.0,
    margin: float = 0.0,
    seq: int | None = None,
    force: bool = False,
) -> Decision:
    """Decide what happens to one claimed message; updates `rec` in place.

    `reserved` is true for a timed row whose slot the valve reserved earlier.
    `rate` None means unlimited (durations, pauses and emergencies still apply).
    `margin` (seconds) widens the hand-out window: a reader returns a message a
    little after its recorded hand-out, and the margin absorbs that lag so that
    the promise also holds on the times the consumer sees. `seq` (the row's
    insertion order) lets several readers keep a destination's order; `force`
    stops waiting for an older message (WAIT) presumed stuck.
    """
    # Any answer but WAIT settles the message's claim (see `claimed`).
    claim = [c for c in rec.claims if c[1] == seq]
    if claim:
        rec.claims = [c for c in rec.claims if c[1] != seq]
    per = rate.per if rate is not None else 1.0
    if emergency:
        _append(rec.slots, now, rate)
        _append(rec.sent, now, rate)
        if duration:
            rec.busy = max(rec.busy, now + duration)
        shift = 0.0
        if policy is not EmergencyPolicy.IGNORE:
            # On the microsecond grid, like the HOLD deferral to it: off the grid, that
            # deferral could round down, come due before the window ends, and bounce.
            until = max(rec.emergency, _after(now, duration or per))
            if policy is EmergencyPolicy.HOLD:
                shift = _push(rec, now, rec.emergency, until)
            rec.emergency = until
        return Decision(Action.DELIVER, now, shift=shift)

    if now < rec.emergency and policy is EmergencyPolicy.DROP:
        return Decision(Action.DEAD, now, reason="emergency")
    window = max(rec.paused, rec.emergency if policy is EmergencyPolicy.HOLD else 0.0)
    if now < window:
        # A reserved message keeps its reservation (and so its place: later ones were
        # pushed back by the window's length); any other goes through the rate after.
        return Decision(Action.DEFER, _r(window), reserved=reserved)

    sent_floor = max(
        _window_floor(rec.sent, rate, margin), rec.sent[-1] if rec.sent else 0.0, rec.busy
    )
    if reserved:
        if seq is not None:
            # Several readers hold due reserved rows (a burst of n shares a slot): the
            # older goes first. A reservation older than ORDER_WAIT is presumed lost.
            if (ahead := older_due(rec, now, seq)) and not force:
                return _wait(rec, claim, now, ahead)
            own = [t for t, q in rec.pending if q == seq]
            if own and own[0] > now and not force:
                # An older message took its slot while this reader held it (the move
                # skipped a leased row): it goes at its new slot, still reserved.
                return Decision(Action.DEFER, own[0], reserved=True)
        # Its slot is already reserved: confirm against actual hand-outs only.
        at = _r(max(now, sent_floor))
        if at - now > MAX_LEAD:
            # The hand-outs fill the window for long yet (a duration, or a backlog
            # handed out later and later): come back then rather than wait holding
            # it. Lost state then never hides a hand-out more than MAX_LEAD after
            # the loss (see Valve._quarantine).
            if seq is not None:
                rec.pending = [[at, p[1]] if p[1] == seq else p for p in rec.pending]
            return Decision(Action.DEFER, at, reserved=True)
        if seq is not None:
            rec.pending = [p for p in rec.pending if p[1] != seq]
        _append(rec.sent, at, rate)
        if duration:
            rec.busy = max(rec.busy, at + duration)
        return Decision(Action.DELIVER, at)

    slot = max(now, sent_floor, _window_floor(rec.slots, rate), rec.horizon)
    if rec.slots:
        slot = max(slot, rec.slots[-1])
    # While a backlog drains, a new message queues behind it in the timed lane
    # even when its slot is already due: that keeps per-destination FIFO.
    backlog = rec.deferred > now - fifo_grace
    if backlog:
        slot = max(slot, rec.deferred)
    if seq is not None:
        ahead = 0 if slot > now or backlog or force else older_due(rec, now, seq)
        if ahead:
            # Another reader claimed an older message of this destination and has not
            # brought it here yet: let it go first (a deferral needs no wait: an
            # older message arriving later takes a younger one's slot).
            return _wait(rec, claim, now, ahead)
    if slot <= now and not backlog:
        at = _r(now)
        _append(rec.slots, at, rate)
        _append(rec.sent, at, rate)
        if duration:
            rec.busy = max(rec.busy, at + duration)
            rec.horizon = max(rec.horizon, at + duration)
        return Decision(Action.DELIVER, at)
    slot = _r(slot)
    _append(rec.slots, slot, rate)
    if slot > now:
        rec.deferred = slot
    if duration:
        rec.horizon = max(rec.horizon, slot + duration)
    if seq is None:
        return Decision(Action.DEFER, slot, reserved=True)
    mine, moves = take_older_place(rec, now, slot, seq)
    return Decision(Action.DEFER, mine, reserved=True, moves=moves)


# The furthest ahead of `now` a hand-out is scheduled (the reader waits for it): a
# drained backlog drifts some ms per window behind its slots, so this is generous.
MAX_LEAD = 1.0


def _wait(rec: Record, claim: list[list[float]], now: float, ahead: int) -> Decision:
    """WAIT: the message is still held, so its claim stays. Ask again after about a
    store round trip per older message ahead."""
    if claim:
        rec.claims = sorted(rec.claims + claim, key=lambda c: c[1])
    return Decision(Action.WAIT, now + min(0.002 + 0.001 * (ahead - 1), 0.05))


def _push(rec: Record, now: float, old_end: float, new_end: float) -> float:
    """A window (pause, HOLD emergency) now ends at `new_end`: push every future
    reservation back by the time it adds, so reserved messages keep their order and
    spacing. Returns the shift; the queue's reserved rows must move by as much."""
    shift = _r(new_end - max(now, old_end))
    future = (rec.slots and rec.slots[-1] > now) or rec.deferred > now
    if shift <= 0 or not future:
        return 0.0
    rec.slots = [_r(t + shift) if t > now else t for t in rec.slots]
    rec.pending = [[_r(t + shift) if t > now else t, q] for t, q in rec.pending]
    if rec.deferred > now:
        rec.deferred = _r(rec.deferred + shift)
    if rec.horizon > now:
        rec.horizon = _r(rec.horizon + shift)
    return shift


def pause(rec: Record, now: float, seconds: float) -> float:
    """Nothing is delivered before now + seconds; returns the shift of reservations."""
    until = max(rec.paused, _after(now, seconds))
    shift = _push(rec, now, rec.paused, until)
    rec.paused = until
    return shift


def resume(rec: Record) -> None:
    rec.paused = 0.0


def forget(rec: Record, at: float) -> None:
    """A hand-out recorded for `at` did not happen then (its reader held it past its
    margin): its entry leaves the log, and the message is confirmed again as a
    reserved one. Left in, it would count twice, and the destination would lose a
    window of hand-outs to it."""
    if at in rec.sent:
        rec.sent.remove(at)
