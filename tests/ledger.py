"""A Jepsen-style ledger for queue workloads, and its checker.

Writers record every insert they attempted and every insert that returned;
readers record every delivery. The checker reports:
  lost        acknowledged inserts never delivered (nor left in the queue)
  unexpected  deliveries of ids nobody attempted to insert
  duplicated  ids delivered more than once (allowed only after a fault)
  exceedances windows where a destination got more than its rate
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from mvalve_async import Message, Rate

# Every checker line of the session, printed in pytest's terminal summary (conftest).
LINES: list[str] = []


@dataclass
class Report:
    lost: int
    unexpected: int
    duplicated: int
    exceedances: int
    delivered: int
    acknowledged: int

    def line(self, name: str) -> str:
        text = (
            f"ledger[{name}]: acknowledged {self.acknowledged}, delivered {self.delivered}, "
            f"lost {self.lost}, unexpected {self.unexpected}, duplicated {self.duplicated}, "
            f"exceedances {self.exceedances}"
        )
        LINES.append(text)
        return text


@dataclass
class Ledger:
    attempted: set[str] = field(default_factory=set)
    acknowledged: set[str] = field(default_factory=set)
    deliveries: Counter[str] = field(default_factory=Counter)
    stamps: dict[str, list[float]] = field(default_factory=dict)

    def attempt(self, msg: Message) -> None:
        self.attempted.add(msg.id)

    def acked(self, msg: Message) -> None:
        self.acknowledged.add(msg.id)

    def delivered(self, msg: Message, throttled: bool = True) -> None:
        self.deliveries[msg.id] += 1
        if throttled and msg.delivered_at is not None and msg.lane != "emergency":
            self.stamps.setdefault(msg.destination, []).append(msg.delivered_at)

    def check(self, rate: Rate | None = None) -> Report:
        delivered = set(self.deliveries)
        exceed = 0
        if rate is not None:
            for times in self.stamps.values():
                exceed += windows_over(sorted(times), rate.n, rate.per)
        return Report(
            lost=len(self.acknowledged - delivered),
            unexpected=len(delivered - self.attempted),
            duplicated=sum(1 for c in self.deliveries.values() if c > 1),
            exceedances=exceed,
            delivered=len(delivered),
            acknowledged=len(self.acknowledged),
        )


def max_in_window(times: Sequence[float], per: float, eps: float = 0.0) -> int:
    """Most deliveries in any half-open window of `per` seconds (two-pointer sweep);
    `eps` forgives float noise below the microsecond the records keep."""
    ordered, best, start = sorted(times), 0, 0
    for end, t in enumerate(ordered):
        while t >= ordered[start] + per - eps:
            start += 1
        best = max(best, end - start + 1)
    return best


def windows_over(times: list[float], n: int, per: float) -> int:
    """How many deliveries end a half-open window of `per` holding more than n."""
    over, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - per:
            lo += 1
        if hi - lo + 1 > n:
            over += 1
    return over
