"""One clock for every reader: the rate holds when the hosts' clocks disagree.

Every timestamp that crosses processes (slots and hand-outs in the store, pauses,
emergency windows, leases, `ready` of timed rows, stats) is taken on one shared
clock, `queue.clock`:

- MySQL dialects (innodb, q4m; a sharded queue: its first shard): the queue
  server's clock, estimated in each process NTP-style. A sample is one
  `SELECT UNIX_TIMESTAMP(NOW(6))`: offset = server time - midpoint of the round
  trip on this host's *monotonic* clock, error bound = half the round trip. The
  best (shortest) of a few samples is kept and refreshed every `refresh` seconds
  in the background; between samples the error grows by `drift` (50 ppm: the most
  two quartz clocks usually differ). `now()` is monotonic time + offset, so the
  host's wall clock, skewed or stepping, plays no part at all.
- sqlite and memory (one host): the host's clock, error 0.

The valve folds `error` into every window (schedule.py), so the promise holds on
the server's clock, which is then the one clock that matters: the rate is as exact
as the server clock's own rate, plus a round trip's half.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "LocalClock", "ServerClock"]

log = logging.getLogger(__name__)


@runtime_checkable
class Clock(Protocol):
    """Seconds since the epoch on the queue's shared clock, and how far off they
    may be (seconds, a bound)."""

    def now(self) -> float: ...

    @property
    def error(self) -> float: ...


class LocalClock:
    """The host's clock: for queues that live on this host (sqlite, memory)."""

    error = 0.0

    def now(self) -> float:
        return time.time()

    def __repr__(self) -> str:
        return "LocalClock()"


class ServerClock:
    """The queue server's clock, estimated from `sample()` (an awaitable of the
    server's epoch seconds). `calibrate()` before first use; it refreshes itself
    every `refresh` seconds afterwards (a task started by `now()`). A host whose
    wall clock is more than `warn_skew` seconds off the server's is logged once."""

    def __init__(
        self,
        sample: Callable[[], Awaitable[float]],
        *,
        where: str = "the queue server",
        samples: int = 3,
        refresh: float = 5.0,
        drift: float = 50e-6,
        warn_skew: float = 0.1,
    ) -> None:
        self._sample = sample
        self.where = where
        self.samples = samples
        self.refresh = refresh
        self.drift = drift
        self.warn_skew = warn_skew
        self.calibrations = 0  # successful ones (each `samples` queries)
        self._offset: float | None = None
        self._half_rtt = 0.0
        self._at = 0.0  # monotonic time of the kept sample (its drift runs from then)
        self._tried = 0.0  # monotonic time of the last calibration (the next one's base)
        self._stale = False  # the server may have changed: the next sample is taken
        self._last = 0.0  # the last value now() returned: it never goes back
        self._task: asyncio.Task[None] | None = None
        self._warned = False

    @property
    def calibrated(self) -> bool:
        return self._offset is not None

    @property
    def error(self) -> float:
        """Half the kept sample's round trip, its drift since, and how far `now()` is
        held ahead of the estimate (it never goes back when a calibration lowers the
        offset)."""
        mono = time.monotonic()
        held = self._last - (mono + self._offset) if self._offset is not None else 0.0
        return self._half_rtt + self.drift * max(0.0, mono - self._at) + max(0.0, held)

    @property
    def offset(self) -> float:
        """Server time minus this host's wall clock (seconds), as last estimated."""
        return self.now() - time.time()

    async def calibrate(self) -> None:
        """Take `samples` samples and keep the best one (the smallest round trip), if
        it beats what is kept once its drift is counted. Raises what `sample` raises
        when it could take none."""
        best: tuple[float, float, float] | None = None  # (half rtt, offset, at)
        for _ in range(self.samples):
            t0 = time.monotonic()
            server = await self._sample()
            t1 = time.monotonic()
            half = (t1 - t0) / 2
            if best is None or half < best[0]:
                best = (half, server - (t0 + t1) / 2, (t0 + t1) / 2)
        assert best is not None
        half, offset, at = best
        self._tried = time.monotonic()
        if self._offset is None or self._stale or half <= self.error:
            self._half_rtt, self._offset, self._at = half, offset, at
            self._stale = False
        self.calibrations += 1
        skew = time.time() - (time.monotonic() + self._offset)
        if abs(skew) > self.warn_skew and not self._warned:
            self._warned = True
            log.warning(
                "this host's clock is %+.3f s off %s's: the valve keeps time on the "
                "server's clock (error bound %.2f ms)", skew, self.where, self.error * 1e3,
            )  # fmt: skip

    def invalidate(self) -> None:
        """The server may have changed (a failover): the next `now()` calibrates again,
        and its sample replaces the kept one whatever its round trip."""
        self._stale = True
        self._tried = 0.0

    def now(self) -> float:
        if self._offset is None:
            raise RuntimeError(f"the clock of {self.where} is not calibrated: connect first")
        mono = time.monotonic()
        if mono - self._tried > self.refresh and (self._task is None or self._task.done()):
            try:
                self._task = asyncio.get_running_loop().create_task(self._recalibrate())
            except RuntimeError:  # no running loop: the next call will
                pass
        value = max(self._last, mono + self._offset)
        self._last = value
        return value

    async def _recalibrate(self) -> None:
        try:
            await self.calibrate()
        except Exception as exc:  # the server is away: keep the estimate, its error grows
            log.debug("clock sample from %s failed: %r", self.where, exc)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def __repr__(self) -> str:
        state = f"error={self.error * 1e3:.2f}ms" if self.calibrated else "uncalibrated"
        return f"ServerClock({self.where}, {state})"
