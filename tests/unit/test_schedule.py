"""The valve's promise, checked on the pure schedule (throttle/schedule.py) by
playing readers against one destination's record the way the reader engine does.

`play` drives several readers, each with its own clock error (within the bound
the valve is told), through random checkouts, hand-outs (in time, or late past
the margin), give-backs, deaths while holding, emergencies and durations, on a
true clock that only moves forward. It records the *true* times of hand-outs,
which is what the promise is about: at most n in any half-open window of `per`,
emergencies excepted, and a destination's messages in insertion order.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvalve_async.errors import CodecError, ConfigError
from mvalve_async.throttle import MAX_EXACT_LOG, EmergencyPolicy, Rate, Record
from mvalve_async.throttle import schedule as sch
from mvalve_async.tuning import HELD_RETRY, RECORD_MARGIN
from tests.ledger import max_in_window as _max_in_window

T0 = 1_700_000_000.0
EPS = 1e-6  # records keep microseconds; epoch floats resolve ~0.24 µs
LEASE = 30.0
DROP, HOLD, IGNORE = EmergencyPolicy.DROP, EmergencyPolicy.HOLD, EmergencyPolicy.IGNORE


def max_in_window(times: list[float], per: float) -> int:
    return _max_in_window(times, per, EPS)


@dataclass
class Reader:
    name: str
    skew: float  # its clock minus true time
    group: list[tuple[float, float, int]] = field(default_factory=list)  # slot, entry, msg
    token: str = ""
    unused: list[float] = field(default_factory=list)
    late: list[tuple[float, float]] = field(default_factory=list)
    busy: float = 0.0
    groups: int = 0


@dataclass
class Run:
    handed: list[tuple[float, int]] = field(default_factory=list)  # (true time, msg seq)
    emergencies: list[float] = field(default_factory=list)
    grants: int = 0
    refused_held: int = 0
    max_size: int = 0


def play(
    rate: Rate | None,
    actions: list[tuple[int, int, float]],
    *,
    readers: int = 3,
    error: float = 0.0005,
    margin: float = 0.01,
    lead: float = 1.0,
    duration: float | None = None,
    policy: EmergencyPolicy = DROP,
) -> Run:
    """`actions`: (kind, reader, x) with x in [0, 1) a random amount. Kinds: 0 wait,
    1 checkout, 2 hand out the next slot, 3 give the rest back, 4 die, 5 emergency."""
    rec, run = Record(), Run()
    rs = [Reader(f"r{k}", error * (2 * ((k * 0.37) % 1) - 1)) for k in range(readers)]
    true, seq = T0, 0
    slack = margin + error
    per = rate.per if rate else 1.0

    def checkin(r: Reader) -> None:
        sch.checkin(rec, r.token, rate, unused=r.unused, late=r.late, busy=r.busy)
        r.group, r.token, r.unused, r.late, r.busy = [], "", [], [], 0.0

    for kind, k, x in actions:
        r = rs[k % readers]
        if kind == 0:
            true += x * per * 0.6
        elif kind == 1 and not r.group:
            r.groups += 1
            token = f"{r.name}.{r.groups}"
            now = true + r.skew
            g = sch.grant(
                rec, now, rate, want=1 + int(x * 8), token=token, until=now + LEASE,
                slack=slack, error=error, lead=lead, policy=policy,
            )  # fmt: skip
            if g.slots:
                run.grants += 1
                assert rec.hold == token
                r.token = token
                for slot, entry in zip(g.slots, g.entries, strict=True):
                    assert slot >= now - EPS and entry == pytest.approx(slot + slack, abs=EPS)
                    r.group.append((slot, entry, seq))
                    seq += 1
            elif rec.hold and rec.hold != token and rec.hold_until > now:
                run.refused_held += 1
                assert g.next_try > now
        elif kind == 2 and r.group:
            slot, entry, msg = r.group.pop(0)
            # never before its slot (the reader waits), maybe late past the margin
            lag = x * margin * 3
            at = max(true + r.skew, slot) + lag
            true = at - r.skew
            run.handed.append((true, msg))
            if at > slot + margin:
                # late: its entry moves to the actual time, and the group's later slots
                # (spaced from this one) move as much (the reader engine does the same)
                r.late.append((entry, at + margin + error))
                shift = at - slot
                moved = []
                for s2, e2, m2 in r.group:
                    r.late.append((e2, round(e2 + shift, 6)))
                    moved.append((round(s2 + shift, 6), round(e2 + shift, 6), m2))
                r.group = moved
            if duration:
                r.busy = at + margin + error + duration
                r.unused += [e for _, e, _ in r.group]
                r.group = []
            if not r.group:
                checkin(r)
        elif kind == 3 and r.token:
            r.unused += [e for _, e, _ in r.group]
            r.group = []
            checkin(r)
        elif kind == 4 and r.token:  # dies holding: no checkin; the hold ends by itself
            r.group, r.token, r.unused, r.late = [], "", [], []
            true = max(true, rec.hold_until - r.skew)  # its leases (and hold) run out
        elif kind == 5:
            now = true + r.skew
            sch.emergency(rec, now, rate, duration=duration, policy=policy, slack=slack)
            run.emergencies.append(true)
        run.max_size = max(run.max_size, len(rec.dumps()))
    return run


kinds = st.sampled_from([0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 5])
action_lists = st.lists(
    st.tuples(kinds, st.integers(0, 5), st.floats(0, 0.999)), min_size=10, max_size=150
)
rates = st.builds(Rate, st.integers(1, 12), st.floats(0.05, 3), st.booleans())
prop = settings(max_examples=300, deadline=None)


@prop
@given(rates, action_lists, st.integers(1, 4), st.sampled_from([0.0, 0.0005, 0.02]))
def test_no_window_holds_more_than_n_on_true_time(
    rate: Rate, actions: list[tuple[int, int, float]], readers: int, error: float
) -> None:
    """Readers with clocks up to `error` off, late hand-outs, give-backs, readers
    dying with a hold and emergencies: never more than n in any window of `per`
    on the true clock, emergencies excepted (they count against the others)."""
    run = play(rate, actions, readers=readers, error=error)
    times = [t for t, _ in run.handed]
    assert max_in_window(times, rate.per) <= rate.n


@prop
@given(rates, action_lists, st.integers(1, 4))
def test_a_destinations_messages_leave_in_order(
    rate: Rate, actions: list[tuple[int, int, float]], readers: int
) -> None:
    """Messages are numbered as slots are granted (a claim leases the oldest rows in
    slot order): hand-outs on the true clock follow that numbering, whatever the
    readers, because only the holder hands out until it checks in."""
    run = play(rate, [a for a in actions if a[0] != 4], readers=readers)
    order = [m for _, m in sorted(run.handed)]
    assert order == sorted(order)


@prop
@given(rates, action_lists)
def test_a_duration_keeps_the_destination_busy(
    rate: Rate, actions: list[tuple[int, int, float]]
) -> None:
    run = play(rate, actions, duration=0.3, readers=2)
    times = sorted(t for t, _ in run.handed)
    assert all(b - a >= 0.3 - 2 * 0.0005 - EPS for a, b in itertools.pairwise(times))


def test_a_backlog_drains_in_ceil_k_over_n_windows() -> None:
    """One reader, a backlog of 45 at Rate(10, 1), checked out as soon as allowed:
    the last goes out in the fifth window, not later (margin and error aside)."""
    rate = Rate(10, 1.0)
    rec, now, handed, token = Record(), T0, [], 0
    while len(handed) < 45:
        token += 1
        g = sch.grant(rec, now, rate, want=45 - len(handed), token=str(token),
                      until=now + LEASE, slack=0.01, lead=0.0)  # fmt: skip
        if not g.slots:
            now = g.next_try
            continue
        handed += g.slots
        sch.checkin(rec, str(token), rate)
    assert max_in_window(handed, 1.0) == 10
    assert handed[-1] - T0 == pytest.approx(4 * 1.01, abs=1e-5)


def test_another_readers_hold_refuses_until_checkin_or_its_end() -> None:
    rate, rec = Rate(5, 1.0), Record()
    g = sch.grant(rec, T0, rate, want=2, token="a.1", until=T0 + 10)
    assert len(g.slots) == 2 and rec.hold == "a.1"
    refused = sch.grant(rec, T0 + 0.1, rate, want=2, token="b.1", until=T0 + 10)
    assert refused.slots == () and refused.next_try == pytest.approx(T0 + 0.1 + HELD_RETRY)
    sch.checkin(rec, "a.1", rate, unused=g.entries[1:])
    assert rec.hold == "" and len(rec.sent) == 1  # the unused slot left the log
    g2 = sch.grant(rec, T0 + 0.1, rate, want=9, token="b.1", until=T0 + 10, lead=0.0)
    assert len(g2.slots) == 4  # 5 per window, one used
    assert sch.grant(rec, T0 + 11, rate, want=1, token="c.1", until=T0 + 20).slots  # b's ended


def test_a_late_checkin_of_a_lost_hold_releases_nothing_of_the_new_one() -> None:
    rate, rec = Rate(3, 1.0), Record()
    g = sch.grant(rec, T0, rate, want=3, token="a.1", until=T0 + 1)
    g2 = sch.grant(rec, T0 + 2, rate, want=3, token="b.1", until=T0 + 5)
    assert g.slots and g2.slots
    sch.checkin(rec, "a.1", rate, unused=g.entries)  # too late: its hold had ended
    assert rec.hold == "b.1"
    assert sch.grant(rec, T0 + 2.5, rate, want=1, token="c.1", until=T0 + 6).slots == ()


def test_slots_come_at_most_lead_ahead_and_tell_when_to_ask_again() -> None:
    rate, rec = Rate(1, 10.0), Record()
    (first,) = sch.grant(rec, T0, rate, want=1, token="a", until=T0 + 30, lead=1.0).slots
    sch.checkin(rec, "a", rate)
    g = sch.grant(rec, T0 + 1, rate, want=1, token="b", until=T0 + 31, lead=1.0)
    assert g.slots == () and g.next_try == pytest.approx(first + 10 - 1.0)
    g = sch.grant(rec, g.next_try, rate, want=2, token="b", until=T0 + 40, lead=1.0)
    assert g.slots == (pytest.approx(first + 10),)  # a moment ahead: the reader waits


def test_paced_rates_space_every_slot() -> None:
    """(per + slack + error) / n apart: at least per / n on the hand-out stamps; the
    margin and the errors once per window, not once per slot."""
    rate, rec = Rate(4, 1.0, pace=True), Record()
    g = sch.grant(rec, T0, rate, want=8, token="a", until=T0 + 30, lead=1.0,
                  slack=0.011, error=0.001)  # fmt: skip
    assert len(g.slots) == 4
    gaps = [b - a for a, b in zip(g.slots, g.slots[1:], strict=False)]
    assert all(gap == pytest.approx(0.253, abs=1e-6) for gap in gaps)
    sch.checkin(rec, "a", rate)
    g2 = sch.grant(rec, g.slots[-1], rate, want=1, token="b", until=T0 + 30, lead=1.0,
                   slack=0.011, error=0.001)  # fmt: skip
    assert g2.slots == (pytest.approx(g.slots[-1] + 0.253, abs=1e-6),)  # across groups too


@pytest.mark.parametrize("n", [1, 2, 3, 5, 300])
@pytest.mark.parametrize("late", [0, 1, 2])
def test_paced_slots_keep_the_promise_when_one_goes_out_a_margin_late(n: int, late: int) -> None:
    """The worst case of the paced spacing: in every group, slot `late` goes out a
    whole margin after its slot, on a clock `error` behind, and the others on time on
    a clock `error` ahead. Still at most n in any window of per on true time."""
    rate, margin, error = Rate(n, 1.0, pace=True), 0.01, 0.0005
    rec, now, true_times, token = Record(), T0, [], 0
    while len(true_times) < 3 * n + 10:
        token += 1
        g = sch.grant(rec, now, rate, want=4, token=str(token), until=now + 30, lead=1.0,
                      slack=margin + error, error=error)  # fmt: skip
        for i, slot in enumerate(g.slots):
            true_times.append(slot + margin + error if i == late else slot - error)
        sch.checkin(rec, str(token), rate)
        now = max(g.slots[-1] if g.slots else now, g.next_try)
    assert max_in_window(true_times, rate.per) <= n


def test_a_fast_paced_rate_gets_its_rate_not_one_per_margin() -> None:
    """Rate(1000, 1) (paced: n > 256) with the default 10 ms margin, groups of 16
    handed out on time: 990 per second, where spacing slots by the margin each gave
    91. And never more than 1000 in a second of stamps."""
    rate, rec, now, handed, token = Rate(1000, 1.0), Record(), T0, [], 0
    while now < T0 + 3:
        token += 1
        g = sch.grant(rec, now, rate, want=16, token=str(token), until=now + 30, lead=0.05,
                      slack=0.0102, error=0.0002)  # fmt: skip
        handed += g.slots
        sch.checkin(rec, str(token), rate)
        now = max(g.slots[-1] if g.slots else now, g.next_try)
    steady = [t for t in handed if T0 + 1 <= t < T0 + 2]
    assert 985 <= len(steady) <= 1000
    assert max_in_window(handed, 1.0) <= 1000


@pytest.mark.parametrize("policy", [DROP, HOLD, IGNORE])
def test_an_emergency_opens_a_window_by_policy(policy: EmergencyPolicy) -> None:
    rate, rec = Rate(100, 1.0), Record()
    end = sch.emergency(rec, T0, rate, duration=0.5, policy=policy)
    g = sch.grant(rec, T0 + 0.1, rate, want=3, token="a", until=T0 + 30, policy=policy)
    if policy is IGNORE:
        assert end == 0 and len(g.slots) == 3 and g.slots[0] >= T0 + 0.5  # its duration
    elif policy is DROP:
        assert end == pytest.approx(T0 + 0.5) and g.drop and not g.slots
        assert sch.state(rec, T0 + 0.1, policy) == (T0 + 0.1, True)
    else:
        assert not g.drop and not g.slots and g.next_try == pytest.approx(T0 + 0.5)
    sch.checkin(rec, "a", rate, unused=g.entries)
    after = sch.grant(rec, T0 + 0.6, rate, want=3, token="b", until=T0 + 30, policy=policy)
    assert len(after.slots) == 3 and not after.drop


def test_an_emergency_counts_in_the_log() -> None:
    rate, rec = Rate(2, 1.0), Record()
    sch.emergency(rec, T0, rate, duration=None, policy=IGNORE)
    sch.emergency(rec, T0 + 0.1, rate, duration=None, policy=IGNORE)
    g = sch.grant(rec, T0 + 0.2, rate, want=1, token="a", until=T0 + 30, lead=0.0)
    assert g.slots == () and g.next_try >= T0 + 1.0 - 0.0  # the window is full of them


def test_a_pause_holds_everything_and_resume_ends_it() -> None:
    rate, rec = Rate(5, 1.0), Record()
    until = sch.pause(rec, T0, 3.0)
    assert until == pytest.approx(T0 + 3)
    g = sch.grant(rec, T0 + 1, rate, want=1, token="a", until=T0 + 30)
    assert g.slots == () and g.next_try == pytest.approx(T0 + 3)
    assert sch.state(rec, T0 + 1, DROP) == (pytest.approx(T0 + 3), False)
    sch.resume(rec)
    assert sch.grant(rec, T0 + 1, rate, want=1, token="a", until=T0 + 30).slots


def test_unlimited_destinations_keep_no_log() -> None:
    rec = Record()
    g = sch.grant(rec, T0, None, want=16, token="a", until=T0 + 30)
    assert len(g.slots) == 16 and rec.sent == []


def test_lifetime_covers_what_the_record_remembers() -> None:
    rec = Record()
    rate = Rate(3, 7 * 86400)  # a weekly quota
    sch.grant(rec, T0, rate, want=1, token="a", until=T0 + 30)
    assert sch.lifetime(rec, T0, rate) >= 7 * 86400
    sch.pause(rec, T0, 40 * 86400)
    assert sch.lifetime(rec, T0, None) >= 40 * 86400
    assert sch.lifetime(Record(), T0, Rate(1, 1.0)) == RECORD_MARGIN


def test_the_record_stays_small() -> None:
    rate = Rate(MAX_EXACT_LOG, 1.0)
    rec, now = Record(), T0
    for i in range(300):
        g = sch.grant(rec, now, rate, want=16, token=str(i), until=now + 30, slack=0.01)
        sch.checkin(rec, str(i), rate)
        now = max(now + 0.01, g.next_try)
    assert len(rec.sent) <= MAX_EXACT_LOG
    assert len(rec.dumps()) < 25 * MAX_EXACT_LOG + 200
    paced = Record()
    for i in range(300):
        sch.grant(paced, T0 + i, Rate(1000, 1.0), want=16, token=str(i), until=T0 + 1e6)
        sch.checkin(paced, str(i), Rate(1000, 1.0))
    assert len(paced.sent) == 1


@pytest.mark.parametrize(("n", "per"), [(257, 1.0), (1000, 1.0), (300, 0.1), (1000, 0.7)])
def test_large_rates_are_paced_and_keep_the_promise(n: int, per: float) -> None:
    rate = Rate(n, per)
    assert rate.paced
    rec, now, handed, token = Record(), T0, [], 0
    while len(handed) < n + 50:
        token += 1
        g = sch.grant(rec, now, rate, want=16, token=str(token), until=now + 30, lead=0.05)
        handed += g.slots
        sch.checkin(rec, str(token), rate)
        now = max(g.slots[-1] if g.slots else now, g.next_try)
    assert max_in_window(handed, per) <= n


instants = st.floats(0, 4e9)
records = st.builds(
    Record,
    st.lists(instants, max_size=20).map(sorted),
    instants, instants, instants, st.text(max_size=12), instants,
)  # fmt: skip


@prop
@given(records)
def test_record_round_trips(rec: Record) -> None:
    assert Record.loads(rec.dumps()) == rec
    assert Record.loads(None) == Record()


def test_records_of_the_claim_then_move_valve_still_load() -> None:
    """0.1 wrote versions 2 and 3: [v, slots, sent, busy, horizon, paused, emergency,
    deferred, pending(, claims)]. Their hand-outs, durations, pauses and emergency
    windows carry over; their reservations went with the moved rows."""
    v2 = orjson.dumps([2, [5.0], [1.0, 2.0], 3.0, 9.0, 4.0, 6.0, 7.0, [[8.0, 1]]])
    v3 = orjson.dumps([3, [5.0], [1.0, 2.0], 3.0, 9.0, 4.0, 6.0, 7.0, [], [[1.0, 2]]])
    for raw in (v2, v3):
        assert Record.loads(raw) == Record([1.0, 2.0], 3.0, 4.0, 6.0)


@pytest.mark.parametrize(
    "raw",
    [b"", b"garbage", b"\xff\xfe", b"null", b"{}", b"[]", b"[4]", b"[4,[],0,0,0,\"\"]",
     b"[5,[],0,0,0,\"\",0]", b'[4,"x",0,0,0,"",0]', b"[4,[[1]],0,0,0,\"\",0]",
     b"[4,[],null,0,0,\"\",0]", b"[4,[],0,0,0,7,0]", b"[4,[],0,0,0,\"\",0",
     b"[2,[],[],0,0,0,0,0]", orjson.dumps(Record().dumps().decode())],
)  # fmt: skip
def test_corrupt_record_bytes_raise_codec_error(raw: bytes) -> None:
    with pytest.raises(CodecError):
        Record.loads(raw)


@pytest.mark.parametrize("raw", [b'[4,[],"nan",0,0,"",0]', b'[4,[1e999],0,0,0,"",0]',
                                 b'[true,[],0,0,0,"",0]'])  # fmt: skip
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


def test_a_concurrency_limit_counts_places_in_flight() -> None:
    rec = Record()
    g1 = sch.grant(rec, T0, None, want=5, token="a", until=T0 + 30, limit=2)
    assert len(g1.slots) == 2 and len(g1.inflight) == 2 and rec.live(T0) == 2
    sch.checkin(rec, "a", None, unused=g1.entries[1:], freed=g1.inflight[1:])  # one unused
    assert rec.live(T0) == 1 and rec.limit == 2
    g2 = sch.grant(rec, T0 + 0.1, None, want=5, token="b", until=T0 + 30, limit=2)
    assert len(g2.slots) == 1  # one place left
    sch.checkin(rec, "b", None)
    full = sch.grant(rec, T0 + 0.2, None, want=1, token="c", until=T0 + 30, limit=2)
    assert full.slots == () and full.held and full.next_try == pytest.approx(T0 + 0.22)
    sch.settle(rec, [g1.inflight[0]])  # settled: its place is free
    assert len(sch.grant(rec, T0 + 0.3, None, want=5, token="c", until=T0 + 30, limit=2).slots) == 1
    sch.checkin(rec, "c", None)
    # places of a dead reader lapse when its leases end
    assert rec.live(T0 + 31) == 0
    assert len(sch.grant(rec, T0 + 31, None, want=5, token="d", until=T0 + 60, limit=2).slots) == 2


def test_a_rate_and_a_limit_both_hold() -> None:
    rate, rec = Rate(10, 1.0), Record()
    g = sch.grant(rec, T0, rate, want=16, token="a", until=T0 + 30, limit=3, lead=0.0)
    assert len(g.slots) == 3
    sch.checkin(rec, "a", rate)
    sch.settle(rec, list(g.inflight))
    g = sch.grant(rec, T0, rate, want=16, token="b", until=T0 + 30, limit=30, lead=0.0)
    assert len(g.slots) == 7  # the rate's 10 per window, 3 used
