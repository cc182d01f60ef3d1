"""Per-destination order when several readers share a destination: claims
registered with `claimed` make a younger message wait for an older one another
reader holds, without changing what the rate allows."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from mvalve_async.schedule import ORDER_WAIT, Action, Rate, Record, admit, claimed
from tests.ledger import max_in_window

T0 = 1_700_000_000.0
RATE = Rate(10, per=1.0)


def test_a_younger_message_waits_for_an_older_one_claimed_elsewhere() -> None:
    rec = Record()
    assert claimed(rec, T0, [1, 3])  # reader A's batch
    assert claimed(rec, T0, [2, 4])  # reader B's batch
    assert not claimed(rec, T0, [2])  # already known: no write
    # B reaches its first message before A does: it would overtake 1
    assert admit(rec, T0 + 0.001, RATE, seq=2).action is Action.WAIT
    first = admit(rec, T0 + 0.002, RATE, seq=1)
    assert first.action is Action.DELIVER
    assert admit(rec, T0 + 0.003, RATE, seq=2).action is Action.DELIVER
    assert admit(rec, T0 + 0.004, RATE, seq=4).action is Action.WAIT  # 3 still held by A
    assert admit(rec, T0 + 0.005, RATE, seq=3).action is Action.DELIVER
    assert admit(rec, T0 + 0.006, RATE, seq=4).action is Action.DELIVER
    assert rec.pending == []  # every claim settled


def test_without_claims_or_with_force_nothing_waits() -> None:
    rec = Record()
    assert admit(rec, T0, RATE, seq=2).action is Action.DELIVER  # nobody announced 1
    claimed(rec, T0, [1])
    assert admit(rec, T0 + 0.001, RATE, seq=3, force=True).action is Action.DELIVER


def test_a_claim_older_than_order_wait_is_presumed_lost() -> None:
    rec = Record()
    claimed(rec, T0, [1])  # its reader died
    assert admit(rec, T0 + ORDER_WAIT / 2, RATE, seq=2).action is Action.WAIT
    assert admit(rec, T0 + ORDER_WAIT + 0.001, RATE, seq=2).action is Action.DELIVER


def test_a_deferral_does_not_wait_and_the_older_takes_its_slot_later() -> None:
    rate = Rate(1, per=1.0)
    rec = Record()
    assert admit(rec, T0, rate, seq=1).action is Action.DELIVER  # the window is full now
    claimed(rec, T0, [2, 3])
    young = admit(rec, T0 + 0.001, rate, seq=3)
    assert young.action is Action.DEFER  # no wait: it is not delivered now
    old = admit(rec, T0 + 0.002, rate, seq=2)
    assert old.action is Action.DEFER and old.at == young.at  # 2 takes 3's slot...
    assert old.moves == ((3, young.at, old.at + 1.0),)  # ...and 3 moves to the next one


def test_an_emergency_drop_settles_the_claim() -> None:
    rec = Record()
    claimed(rec, T0, [1, 2])
    assert admit(rec, T0, RATE, emergency=True).action is Action.DELIVER
    assert admit(rec, T0 + 0.001, RATE, seq=1).action is Action.DEAD
    assert admit(rec, T0 + 0.002, RATE, seq=2).action is Action.DEAD
    assert rec.pending == []


@settings(max_examples=150, deadline=None)
@given(
    readers=st.integers(2, 5),
    batch=st.integers(1, 8),
    total=st.integers(1, 60),
    rate=st.builds(Rate, st.integers(1, 8), st.sampled_from([0.05, 0.2, 1.0])),
    seed=st.integers(0, 2**32),
)
def test_readers_in_any_interleaving_deliver_in_order_within_the_rate(
    readers: int, batch: int, total: int, rate: Rate, seed: int
) -> None:
    """Readers claim consecutive batches (announcing them), then admit their own
    messages in order, interleaved at random, every step a few ms apart; deferred
    messages come back when due (with the moves applied). Every message is handed
    out once, never more than n in a window, and in insertion order."""
    rng = random.Random(seed)
    rec, now = Record(), T0
    next_seq = 1
    held: list[list[tuple[int, bool]]] = [[] for _ in range(readers)]  # (seq, reserved)
    timed: dict[int, float] = {}  # seq -> ready of a deferred message
    handed: list[tuple[float, int]] = []
    steps = 0
    while len(handed) < total:
        steps += 1
        assert steps < 100_000, "admissions do not converge"
        now += rng.uniform(0.0005, 0.003)
        r = rng.randrange(readers)
        if not held[r]:
            due = sorted((t, q) for q, t in timed.items() if t <= now)[:batch]
            for _, q in due:
                del timed[q]
            fresh = list(range(next_seq, min(next_seq + batch - len(due), total + 1)))
            next_seq += len(fresh)
            held[r] = [(q, True) for _, q in due] + [(q, False) for q in fresh]
            if held[r]:  # the reader announces its batch, reserved rows included
                claimed(rec, now, [q for q, _ in held[r]])
            if not held[r]:
                continue
        seq, reserved = held[r][0]
        d = admit(rec, now, rate, reserved=reserved, seq=seq)
        if d.action is Action.WAIT:
            continue  # asks again at its next turn
        held[r].pop(0)
        if d.action is Action.DELIVER:
            handed.append((d.at, seq))
        else:
            assert d.action is Action.DEFER
            timed[seq] = d.at
            for q, _old, new in d.moves:
                if q in timed:
                    timed[q] = new
    assert sorted(q for _, q in handed) == list(range(1, total + 1))
    times = [t for t, _ in handed]
    assert max_in_window(times, rate.per, 1e-6) <= rate.n
    order = [q for _, q in sorted(handed)]
    assert order == sorted(order)


def test_a_bulk_backlog_reserved_out_of_order_ends_in_fifo_order() -> None:
    # The bench's drain: 200 messages of a destination at 20/s, decided by readers
    # whose batches interleave. Each older message decided after younger ones takes
    # the earliest of their reservations (the queue moves theirs): the backlog must
    # come out in insertion order, its far end included.
    rate = Rate(20, per=1.0)
    rec = Record()
    for seq in range(1, 21):  # the first window goes at once
        assert admit(rec, T0, rate, seq=seq).action is Action.DELIVER
    backlog = list(range(21, 201))
    rnd = random.Random(5)
    scrambled: list[int] = []
    for i in range(0, len(backlog), 48):  # three readers' batches of 16 at a time
        chunk = backlog[i : i + 48]
        rnd.shuffle(chunk)
        scrambled += chunk
    ready: dict[int, float] = {}
    for k, seq in enumerate(scrambled):
        decision = admit(rec, T0 + k * 1e-4, rate, seq=seq)
        assert decision.action is Action.DEFER
        ready[seq] = decision.at
        for younger, old, new in decision.moves:
            assert ready[younger] == old
            ready[younger] = new
    times = [ready[seq] for seq in backlog]
    assert times == sorted(times)
    assert max_in_window(times, 1.0) <= 20
