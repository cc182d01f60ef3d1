"""The rate promise holds on the microsecond grid for any `per`, paced or not.

Hand-out times live on a microsecond grid (`_r`); a `per` or `per / n` off that
grid (1/3 s, 0.7 s / 206) rounded to the nearest microsecond used to let n + 1
slots into a window a few microseconds short (up to n/2 µs for paced rates:
13 deliveries in one second for `Rate(12, 1, pace=True)`, seen by `mvalve demo`).
"""

from __future__ import annotations

import random

import pytest

from mvalve_async.schedule import Rate, Record, admit
from tests.ledger import max_in_window as _max_in_window

# Epoch floats near 1.8e9 resolve about 0.24 µs: compare to the microsecond.
EPS = 1e-6


def max_in_window(times: list[float], per: float) -> int:
    return _max_in_window(times, per, EPS)


@pytest.mark.parametrize(
    ("n", "per", "pace"),
    [(12, 1.0, True), (206, 0.7, True), (300, 1.0, False), (3, 1 / 3, True),
     (5, 1 / 3, False), (7, 0.7, False), (1, 0.000_333_3, False), (40, 1.0, False)],
)  # fmt: skip
def test_backlog_slots_never_exceed_the_rate(n: int, per: float, pace: bool) -> None:
    rate, rec, now = Rate(n, per, pace=pace), Record(), 1_764_000_000.123_456
    slots = [admit(rec, now, rate).at for _ in range(3 * n + 5)]
    assert max_in_window(slots, per) <= n


def test_random_rates_and_arrivals_keep_the_promise() -> None:
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(1, 300)
        per = rng.choice([1.0, 0.3, 0.7, 2.5, 1 / 3, 0.001])
        rate, rec = Rate(n, per, pace=rng.random() < 0.5), Record()
        now = 1_764_000_000 + rng.random() * 1e5
        slots = []
        for _ in range(2 * n + 3):
            now += rng.random() * per / n
            slots.append(admit(rec, now, rate).at)
        assert max_in_window(slots, per) <= n, (n, per, rate.paced)


def test_margin_widens_the_hand_out_window() -> None:
    from mvalve_async.schedule import Action, Rate, Record, admit

    t0, rate = 1_700_000_000.0, Rate(2, 1.0)
    rec = Record()
    for _ in range(2):
        assert admit(rec, t0, rate, margin=0.01).action is Action.DELIVER
    reserved = admit(rec, t0, rate, margin=0.01)
    assert reserved.action is Action.DEFER
    # due at t0 + 1 by the slots; confirmed no earlier than t0 + 1 + margin
    handed = admit(rec, reserved.at, rate, reserved=True, margin=0.01)
    assert handed.action is Action.DELIVER and handed.at >= t0 + 1.01 - 1e-6
    paced = Record()
    admit(paced, t0, Rate(4, 1.0, pace=True), margin=0.02)
    later = admit(paced, t0, Rate(4, 1.0, pace=True), margin=0.02)
    assert later.at >= t0 + 0.25 + 0.005 - 1e-6  # margin spread over the n spacings
