"""The schedule's promise, checked by driving `admit()` the way a reader does.

`simulate` plays one destination's record on a fake clock. A DEFER moves the
message to the timed lane, whence it comes back at `decision.at` with the
decision's `reserved`; a DELIVER hands it out at `decision.at`. Events run in
(time, insertion) order; a single reader waits for a hand-out a few ms ahead,
so its clock never goes back. The clock starts at an epoch-like T0 (a fresh
record's zero fields mean "never", as on a real clock).
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvalve_async.errors import CodecError, ConfigError
from mvalve_async.schedule import (
    MAX_EXACT_LOG,
    MAX_LEAD,
    Action,
    Decision,
    EmergencyPolicy,
    Rate,
    Record,
    admit,
    forget,
    pause,
    resume,
)
from mvalve_async.stores.memory import MemoryStore
from mvalve_async.valve import UNTOUCHED, Valve, key_for
from tests.ledger import max_in_window as _max_in_window

T0 = 1_700_000_000.0
# Records keep microseconds and epoch floats resolve ~0.24 µs: compare to the µs.
EPS = 1e-6
DELIVER, DEFER, DEAD = Action.DELIVER, Action.DEFER, Action.DEAD
DROP, HOLD, IGNORE = EmergencyPolicy.DROP, EmergencyPolicy.HOLD, EmergencyPolicy.IGNORE


class Bounce(AssertionError):
    """A deferral to a window's end that comes due before the window ends: the message
    would be deferred again at once (for ever on a fake clock)."""


@dataclass(frozen=True)
class Msg:
    arrival: float
    duration: float | None = None
    emergency: bool = False


@dataclass
class Run:
    handed: list[tuple[float, int]] = field(default_factory=list)  # (at, message), in order
    dead: dict[int, str] = field(default_factory=dict)
    steps: list[tuple[float, int, bool, Decision]] = field(default_factory=list)  # now, msg, ...
    pauses: list[tuple[int, float, float]] = field(default_factory=list)  # (step, from, until)
    max_size: int = 0  # of the record's dumps(), when measured

    def times(self, msgs: Sequence[Msg]) -> list[float]:
        """Hand-out times of the non-emergency messages (the ones the promise counts)."""
        return [t for t, i in self.handed if not msgs[i].emergency]

    def order(self) -> list[int]:
        return [i for _, i in self.handed]


def simulate(
    msgs: Sequence[Msg], rate: Rate | None, *, policy: EmergencyPolicy = DROP,
    pauses: Sequence[tuple[float, float]] = (), late: Callable[[int], float] | None = None,
    single_reader: bool = True, measure: bool = False,
) -> Run:  # fmt: skip
    rec, run, events, seq, clock = Record(), Run(), [], 0, 0.0

    def push(t: float, what: int, reserved: bool = False) -> None:
        nonlocal seq
        heapq.heappush(events, (t, seq, what, reserved))
        seq += 1

    for k, (t, _) in enumerate(pauses):  # at equal times a pause comes first
        push(t, -1 - k)
    for i, m in enumerate(msgs):
        push(m.arrival, i)
    while events:
        t, _, what, reserved = heapq.heappop(events)
        now = clock = max(clock, t)
        if what < 0:
            shift_reserved(events, now, pause(rec, now, pauses[-1 - what][1]))
            run.pauses.append((len(run.steps), now, rec.paused))
            continue
        m = msgs[what]
        d = admit(rec, now, rate, duration=m.duration, emergency=m.emergency,
                  reserved=reserved, policy=policy)  # fmt: skip
        shift_reserved(events, now, d.shift)
        run.steps.append((now, what, reserved, d))
        assert len(run.steps) <= 50 * len(msgs), "admissions do not converge"
        assert d.at >= now - EPS, d
        if d.action is DEFER and not d.reserved and d.at <= now:
            raise Bounce(f"{d} for {what} at {now!r} is due before its window ends")
        if d.action is DELIVER:
            run.handed.append((d.at, what))
            if single_reader:
                clock = max(clock, d.at)
        elif d.action is DEFER:
            extra = late(what) if late is not None and d.reserved else 0.0
            push(max(d.at, now) + extra, what, d.reserved)
        else:
            run.dead[what] = d.reason
        if measure:
            run.max_size = max(run.max_size, len(rec.dumps()))
    return run


def shift_reserved(events: list[tuple[float, int, int, bool]], now: float, shift: float) -> None:
    """What `Queue.shift` does to the timed lane: reserved rows due later move back."""
    if shift > 0:
        events[:] = [(t + shift if r and t > now else t, q, w, r) for t, q, w, r in events]
        heapq.heapify(events)


def max_in_window(times: Sequence[float], per: float) -> int:
    return _max_in_window(times, per, EPS)


def assert_all_handed_out_once(run: Run, msgs: Sequence[Msg]) -> None:
    assert sorted(run.order() + list(run.dead)) == list(range(len(msgs)))


offsets = st.floats(0, 10).map(lambda x: round(x, 3))
arrivals = st.lists(offsets, max_size=40).map(lambda xs: [T0 + x for x in sorted(xs)])
rates = st.builds(Rate, st.integers(1, 20), st.floats(0.1, 5), st.booleans())
durations = st.none() | st.floats(0.01, 2)
prop = settings(max_examples=200, deadline=None)


@prop
@given(arrivals, rates, st.booleans())
def test_window_fifo_and_nothing_lost(times: list[float], rate: Rate, one_reader: bool) -> None:
    msgs = [Msg(t) for t in times]
    run = simulate(msgs, rate, single_reader=one_reader)
    assert not run.dead
    assert_all_handed_out_once(run, msgs)
    assert max_in_window(run.times(msgs), rate.per) <= rate.n
    assert all(t >= msgs[i].arrival - EPS for t, i in run.handed)
    if one_reader:
        assert run.order() == sorted(run.order())
    # one admission, plus at most one return of a reserved row: never retry-bound
    assert max(Counter(i for _, i, _, _ in run.steps).values(), default=1) <= 2


@prop
@given(st.integers(1, 120), rates)
def test_a_backlog_drains_in_ceil_k_over_n_windows(k: int, rate: Rate) -> None:
    run = simulate([Msg(T0)] * k, rate)
    assert run.order() == list(range(k))
    last = run.handed[-1][0] - T0
    windows = math.ceil(k / rate.n) - 1
    expected = (k - 1) * rate.spacing if rate.paced else windows * rate.per
    # each slot may be rounded up to the next microsecond
    assert expected - EPS <= last <= expected + 2 * k * EPS
    assert last < math.ceil(k / rate.n) * rate.per
    assert len(run.steps) <= 2 * k


@prop
@given(st.lists(st.tuples(offsets, durations), max_size=30), st.none() | rates)
def test_a_duration_keeps_the_destination_busy(
    items: list[tuple[float, float | None]], rate: Rate | None
) -> None:
    msgs = [Msg(T0 + t, d) for t, d in sorted(items, key=lambda x: x[0])]
    run = simulate(msgs, rate)
    assert_all_handed_out_once(run, msgs)
    assert run.order() == sorted(run.order())
    for (a, i), (b, _) in zip(run.handed, run.handed[1:], strict=False):
        assert b >= a + (msgs[i].duration or 0.0) - EPS
    if rate is not None:
        assert max_in_window(run.times(msgs), rate.per) <= rate.n


@pytest.mark.parametrize("policy", list(EmergencyPolicy))
def test_emergency_goes_at_once_and_opens_a_window_by_policy(policy: EmergencyPolicy) -> None:
    rec, rate = Record(), Rate(1, 1.0)
    assert admit(rec, T0, rate, policy=policy) == Decision(DELIVER, T0)
    # over the rate, yet delivered at once
    assert admit(rec, T0 + 0.1, rate, emergency=True, policy=policy) == Decision(DELIVER, T0 + 0.1)
    later = admit(rec, T0 + 0.5, Rate(5, 1.0), policy=policy)
    if policy is DROP:
        assert (later.action, later.reason) == (DEAD, "emergency")
    elif policy is HOLD:
        assert later == Decision(DEFER, T0 + 1.1)
        assert not later.reserved
    else:
        assert later == Decision(DELIVER, T0 + 0.5)
    # the window is half-open: at its end the destination is open again
    assert admit(rec, T0 + 1.1, Rate(5, 1.0), policy=policy).action is DELIVER


def test_emergency_windows_last_a_duration_count_in_the_log_and_meet_reservations() -> None:
    rec, rate = Record(), Rate(1, 1.0)
    assert admit(rec, T0, rate, emergency=True, duration=3.0).action is DELIVER
    assert admit(rec, T0 + 2.9, rate).action is DEAD
    assert admit(rec, T0 + 3.0, rate, policy=HOLD).action is DELIVER
    rec = Record()  # with IGNORE the emergency still counts in the log
    admit(rec, T0, rate, emergency=True, policy=IGNORE)
    assert admit(rec, T0 + 0.5, rate, policy=IGNORE) == Decision(DEFER, T0 + 1.0, reserved=True)
    rec = Record()  # a window that began after a reservation still applies to it
    admit(rec, T0, rate)
    assert admit(rec, T0, rate) == Decision(DEFER, T0 + 1.0, reserved=True)
    admit(rec, T0 + 0.5, rate, emergency=True)
    assert admit(rec, T0 + 1.0, rate, reserved=True).reason == "emergency"


@pytest.mark.parametrize("per", [1 / 3, 1.2578125])
def test_a_held_message_comes_back_after_the_window(per: float) -> None:
    # T0 + per is off the microsecond grid: a HOLD deferral rounded to the nearest
    # microsecond came due before the window ended and bounced (for ever here)
    msgs = [Msg(T0, emergency=True), Msg(T0)]
    run = simulate(msgs, Rate(1, per), policy=HOLD)
    assert run.order() == [0, 1]


@prop
@given(
    st.lists(st.tuples(offsets, st.booleans()), max_size=30),
    rates,
    st.sampled_from(list(EmergencyPolicy)),
)
def test_emergencies_bypass_and_everything_else_keeps_the_promise(
    items: list[tuple[float, bool]], rate: Rate, policy: EmergencyPolicy
) -> None:
    msgs = [Msg(T0 + t, emergency=e) for t, e in sorted(items, key=lambda x: x[0])]
    run = simulate(msgs, rate, policy=policy)
    assert_all_handed_out_once(run, msgs)
    assert max_in_window(run.times(msgs), rate.per) <= rate.n
    emergencies = [now for now, i, _, _ in run.steps if msgs[i].emergency]
    for now, i, _, d in run.steps:
        if msgs[i].emergency:
            assert (d.action, d.at) == (DELIVER, now)
        elif d.action is DEAD:  # only DROP kills, only inside an emergency's window
            assert policy is DROP and d.reason == "emergency"
            assert any(e <= now < e + rate.per for e in emergencies)
    if policy is not DROP:
        assert not run.dead


def test_a_pause_defers_everything_but_emergencies_to_its_end() -> None:
    rec, rate = Record(), Rate(1, 1.0)
    admit(rec, T0, rate)
    assert admit(rec, T0, rate) == Decision(DEFER, T0 + 1.0, reserved=True)
    assert pause(rec, T0 + 0.5, 2.0) == 2.0  # the future reservation moves back 2 s
    assert rec.slots[-1] == T0 + 3.0
    assert pause(rec, T0 + 0.6, 0.1) == 0.0  # a shorter pause never shortens the current one
    # a reserved message due inside the pause keeps its reservation, moved to the end
    assert admit(rec, T0 + 1.0, rate, reserved=True) == Decision(DEFER, T0 + 2.5, True)
    assert admit(rec, T0 + 1.2, rate) == Decision(DEFER, T0 + 2.5)  # a new one: not reserved
    assert admit(rec, T0 + 1.3, rate, emergency=True, policy=IGNORE).action is DELIVER
    # after the pause the kept reservation goes first (confirmed against hand-outs:
    # the emergency at 1.3 is one of them), the new message queues behind the backlog
    assert admit(rec, T0 + 2.5, rate, reserved=True, policy=IGNORE) == Decision(DELIVER, T0 + 2.5)
    later = admit(rec, T0 + 2.5, rate, policy=IGNORE)
    assert later.action is DEFER and later.reserved and later.at >= T0 + 3.5
    pause(rec, T0 + 3.0, 60.0)
    resume(rec)
    assert rec.paused == 0.0


@prop
@given(arrivals, rates, st.lists(st.tuples(offsets, st.floats(0.1, 3)), min_size=1, max_size=3))
def test_nothing_is_handed_out_while_paused(
    times: list[float], rate: Rate, pauses: list[tuple[float, float]]
) -> None:
    msgs = [Msg(t) for t in times]
    run = simulate(msgs, rate, pauses=[(T0 + t, s) for t, s in pauses])
    assert not run.dead
    assert_all_handed_out_once(run, msgs)
    assert max_in_window(run.times(msgs), rate.per) <= rate.n
    for k, (now, _, _, d) in enumerate(run.steps):
        applied = [(a, b) for step, a, b in run.pauses if step <= k]
        until = max((b for _, b in applied), default=0.0)
        if now < until:
            assert (d.action, d.at) == (DEFER, until)
            assert d.reserved == run.steps[k][2]  # a reservation is kept, not made
        if d.action is DELIVER:
            assert not any(a <= d.at < b for a, b in applied)


@pytest.mark.parametrize("interrupt", ["pause", "hold"])
def test_reserved_messages_pushed_by_a_window_keep_their_place(interrupt: str) -> None:
    # Rate(1, 1): 0 goes at T0, 1 and 2 are reserved for T0+1 and T0+2. A pause (or
    # an emergency with HOLD) at T0+0.5 for 1 s pushes both back by the window: once
    # re-admitted behind 2's slot, the order came out 0, 2, 1.
    msgs = [Msg(T0), Msg(T0), Msg(T0)]
    if interrupt == "pause":
        run = simulate(msgs, Rate(1, 1.0), pauses=[(T0 + 0.5, 1.0)])
    else:
        msgs.append(Msg(T0 + 0.5, emergency=True))
        run = simulate(msgs, Rate(1, 1.0), policy=HOLD)
    assert [i for i in run.order() if not msgs[i].emergency] == [0, 1, 2]


def test_a_late_hand_out_pushes_the_one_n_later() -> None:
    rate, rec, delta = Rate(2, 1.0), Record(), 0.3
    first = [admit(rec, T0, rate) for _ in range(6)]
    assert [d.action for d in first] == [DELIVER] * 2 + [DEFER] * 4
    assert [d.at for d in first[2:]] == [T0 + 1, T0 + 1, T0 + 2, T0 + 2]
    # the reader is delta late for messages 2 and 3; 4 and 5 come back on time
    h2, h3, h4, h5 = (admit(rec, t, rate, reserved=True) for t in
                      (T0 + 1 + delta, T0 + 1 + delta, T0 + 2, T0 + 2))  # fmt: skip
    assert {h2.action, h3.action, h4.action, h5.action} == {DELIVER}
    assert h2.at == h3.at == T0 + 1 + delta
    # message 2 + n waits delta (the reader sleeps, no retry) rather than bunching
    assert h4.at >= h2.at + rate.per - EPS
    assert h4.at == pytest.approx(T0 + 2 + delta, abs=EPS)
    assert max_in_window([T0, T0, h2.at, h3.at, h4.at, h5.at], rate.per) <= rate.n


def test_a_hand_out_further_ahead_than_max_lead_comes_back_later() -> None:
    """A duration (or a drifting backlog) can push a reserved message's hand-out far
    off: it goes back to the timed lane until then instead of waiting in a reader,
    so lost state never hides a hand-out scheduled beyond MAX_LEAD."""
    rate, rec = Rate(1, 1.0), Record()
    long = MAX_LEAD + 2.0
    assert admit(rec, T0, rate, duration=long).action is DELIVER
    reserved = admit(rec, T0 + 0.001, rate)
    assert reserved.action is DEFER and reserved.at == pytest.approx(T0 + long, abs=EPS)
    early = admit(rec, T0 + 1.0, rate, reserved=True)  # claimed at an older ready
    assert early.action is DEFER and early.reserved
    assert early.at == pytest.approx(T0 + long, abs=EPS)
    again = admit(rec, early.at, rate, reserved=True)
    assert again.action is DELIVER and again.at == early.at


def test_a_hand_out_a_moment_ahead_is_delivered_with_a_wait() -> None:
    rate, rec = Rate(1, 1.0), Record()
    assert admit(rec, T0, rate).action is DELIVER
    assert admit(rec, T0 + 0.001, rate).at == T0 + 1  # reserved for T0 + 1
    early = admit(rec, T0 + 1 - MAX_LEAD / 2, rate, reserved=True)  # a reader's clock
    assert early.action is DELIVER and early.at == T0 + 1  # it waits MAX_LEAD / 2


@prop
@given(arrivals, rates, st.lists(st.floats(0, 2), min_size=1, max_size=8))
def test_late_hand_outs_never_break_the_window(
    times: list[float], rate: Rate, lates: list[float]
) -> None:
    msgs = [Msg(t) for t in times]
    run = simulate(msgs, rate, late=lambda i: lates[i % len(lates)], single_reader=False)
    assert not run.dead
    assert_all_handed_out_once(run, msgs)
    assert max_in_window(run.times(msgs), rate.per) <= rate.n


instants = st.floats(0, 4e9)
records = st.builds(
    Record,
    st.lists(instants, max_size=20).map(sorted),
    st.lists(instants, max_size=20).map(sorted),
    instants, instants, instants, instants, instants,
)  # fmt: skip


@prop
@given(records)
def test_record_round_trips(rec: Record) -> None:
    assert Record.loads(rec.dumps()) == rec
    assert Record.loads(None) == Record()


@pytest.mark.parametrize(
    "raw",
    [b"", b"garbage", b"\xff\xfe", b"null", b"{}", b"[]", b"[1]", b"[1,[],[],0,0,0,0]",
     b"[1,[],[],0,0,0,0,0,0]", b"[2,[],[],0,0,0,0,0]", b'[1,"x",[],0,0,0,0,0]',
     b"[1,[[1]],[],0,0,0,0,0]", b"[1,[],[],null,0,0,0,0]", b'[1,[],[],{"a":1},0,0,0,0]',
     b"[1,[],[],0,0,0,0,0", orjson.dumps(Record().dumps().decode())],
)  # fmt: skip
def test_corrupt_record_bytes_raise_codec_error(raw: bytes) -> None:
    with pytest.raises(CodecError):
        Record.loads(raw)


@pytest.mark.parametrize("raw", [b'[1,[],[],"nan",0,0,0,0]', b'[1,["1e999"],[],0,0,0,0,0]',
                                 b"[true,[],[],0,0,0,0,0]"])  # fmt: skip
def test_record_fields_must_be_finite_numbers(raw: bytes) -> None:
    with pytest.raises(CodecError):
        Record.loads(raw)


@prop
@given(st.binary(max_size=80))
def test_arbitrary_bytes_load_as_a_record_or_raise_codec_error(raw: bytes) -> None:
    try:
        assert isinstance(Record.loads(raw), Record)
    except CodecError:
        pass


@pytest.mark.parametrize(("n", "pace"), [(1, False), (20, False), (256, False), (20, True),
                                         (1000, False)])  # fmt: skip
def test_the_record_stays_small_after_10000_admissions(n: int, pace: bool) -> None:
    rate = Rate(n, 1.0, pace)
    # a steady stream at twice the rate: most messages are admitted twice
    msgs = [Msg(T0 + i * rate.spacing / 2) for i in range(5200)]
    run = simulate(msgs, rate, measure=True)
    assert len(run.steps) >= 10_000
    assert run.max_size <= 30 * 2 * (1 if rate.paced else n) + 100


@pytest.mark.parametrize(
    "kwargs",
    [{"n": 0}, {"n": -1}, {"n": 1.0}, {"n": True}, {"n": "3"}, {"n": None},
     {"n": 1, "per": 0}, {"n": 1, "per": -1.0}, {"n": 1, "per": math.nan},
     {"n": 1, "per": math.inf}, {"n": 1, "per": True}, {"n": 1, "per": "1"}],
)  # fmt: skip
def test_bad_rates_raise_config_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Rate(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "rate"),
    [("10/1", Rate(10, 1.0)), ("10/1s", Rate(10, 1.0)), ("2/0.5", Rate(2, 0.5)),
     ("5", Rate(5, 1.0)), ("10/1:pace", Rate(10, 1.0, pace=True))]
    + [(bad, None) for bad in ("", "x/1", "10/", "10/abc", "0/1", "10/0", "10/-1", "1.5/1",
                               "10/nan", "10/inf")],
)  # fmt: skip
def test_rate_parse(text: str, rate: Rate | None) -> None:
    if rate is not None:
        assert Rate.parse(text) == rate
    else:
        with pytest.raises(ConfigError):
            Rate.parse(text)


@pytest.mark.parametrize(("n", "per"), [(257, 1.0), (1000, 1.0), (3000, 1.0), (300, 0.1),
                                        (1000, 0.7)])  # fmt: skip
def test_large_rates_are_paced_and_keep_the_promise(n: int, per: float) -> None:
    rate = Rate(n, per)
    assert rate.paced and n > MAX_EXACT_LOG
    msgs = [Msg(T0)] * (n + 50)
    run = simulate(msgs, rate, measure=True)
    assert run.order() == list(range(len(msgs)))
    assert max_in_window(run.times(msgs), per) <= n
    assert run.max_size <= 200


@settings(max_examples=25, deadline=None)
@given(st.integers(MAX_EXACT_LOG + 1, 3000), st.floats(0.05, 5), arrivals)
def test_large_rates_hold_with_any_per(n: int, per: float, times: list[float]) -> None:
    msgs = [Msg(T0)] * n + [Msg(t + 1) for t in times]
    run = simulate(msgs, Rate(n, per))
    assert_all_handed_out_once(run, msgs)
    assert max_in_window(run.times(msgs), per) <= n


@given(now=st.floats(1e9, 2e9), seq=st.one_of(st.none(), st.integers(1, 2**53)))
def test_an_untouched_record_lets_a_plain_message_through_unchanged(
    now: float, seq: int | None
) -> None:
    # What Valve.decide assumes when it skips `admit` for an unthrottled message.
    rec = Record.loads(UNTOUCHED)
    assert admit(rec, now, None, seq=seq) == Decision(Action.DELIVER, round(now, 6))
    assert rec.dumps() == UNTOUCHED


async def test_the_valve_shortcut_is_for_untouched_records_only() -> None:
    valve = Valve(MemoryStore())
    plain = {"duration": None, "emergency": False, "reserved": False, "seq": 1}
    first = await valve.decide("a", **plain)  # type: ignore[arg-type]
    assert first is not None and first.action is Action.DELIVER
    assert await valve.store.get(key_for("a")) == UNTOUCHED
    await valve.pause("a", 30)
    paused = await valve.decide("a", **plain)  # type: ignore[arg-type]
    assert paused is not None and paused.action is Action.DEFER
    await valve.resume("a")
    again = await valve.decide("a", **plain)  # type: ignore[arg-type]
    assert again is not None and again.action is Action.DELIVER


def test_a_hand_out_that_came_late_is_moved_not_counted_twice() -> None:
    rate, t = Rate(2, per=1.0), 1_700_000_000.0
    rec = Record()
    assert admit(rec, t, rate).action is Action.DELIVER
    second = admit(rec, t + 0.1, rate)
    assert second.action is Action.DELIVER and rec.sent == [t, t + 0.1]
    # its reader hands it out only at t + 0.5: the window still has room then
    forget(rec, second.at)
    again = admit(rec, t + 0.5, rate, reserved=True)
    assert again == Decision(Action.DELIVER, t + 0.5)
    assert rec.sent == [t, t + 0.5]
    # not forgotten, it would have waited for the window to pass a second time
    stale = Record(sent=[t, t + 0.1])
    assert admit(stale, t + 0.5, rate, reserved=True).at == round(t + 1.0, 6)
    forget(rec, 12.0)  # a time it never recorded: nothing changes
    assert rec.sent == [t, t + 0.5]
