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

# Epoch floats near 1.8e9 resolve about 0.24 µs: compare to the microsecond.
EPS = 1e-6


def max_in_window(times: list[float], per: float) -> int:
    ordered, best, start = sorted(times), 0, 0
    for end, t in enumerate(ordered):
        while t >= ordered[start] + per - EPS:
            start += 1
        best = max(best, end - start + 1)
    return best


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
