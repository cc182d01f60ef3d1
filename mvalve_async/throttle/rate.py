"""`Rate` and `EmergencyPolicy`: what a user sets for a destination."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["MAX_EXACT_LOG", "EmergencyPolicy", "Rate"]

# Above this many messages per window the log would make the record large: such
# rates are enforced as paced (per/n spacing), which keeps the promise.
MAX_EXACT_LOG = 256


class EmergencyPolicy(enum.StrEnum):
    DROP = "drop"  # other messages during the window go to dead letters ("emergency")
    HOLD = "hold"  # ... wait for the window's end
    IGNORE = "ignore"  # emergencies open no window


@dataclass(frozen=True, slots=True)
class Rate:
    """At most `n` deliveries in any window of `per` seconds, per destination.

    `pace=True` spaces deliveries `per / n` apart instead of allowing bursts
    (same promise, constant-size state; the valve spaces slots (per + margin + 2
    clock errors) / n apart, schedule._floor). Rates with `n > 256` are always paced.
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

    @property
    def keep(self) -> int:
        """Hand-outs the record must remember: n, or the last one when paced."""
        return 1 if self.paced else self.n

    @classmethod
    def parse(cls, text: str) -> Rate:
        """'10/1', '10/1s', '2/0.5', '10/1:pace' (used by the CLI)."""
        body, _, flag = text.partition(":")
        n, sep, per = body.partition("/")
        try:
            return cls(int(n), float(per.rstrip("s")) if sep else 1.0, pace=flag == "pace")
        except ValueError:
            raise ConfigError(f"rate {text!r} is not of the form N/SECONDS") from None
