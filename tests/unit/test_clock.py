"""ServerClock (clock.py) from controlled samples.

The host's clocks are replaced by a fake (`FakeTime`: a monotonic clock the test
moves, and a wall clock at a chosen skew from it); the server's true time is the
fake monotonic time plus a known offset, and each sample takes controlled delays
out and back. So the estimate's true error is known exactly and can be checked
against the bound the clock claims.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import pytest

from mvalve_async import clock as clock_mod
from mvalve_async.clock import Clock, LocalClock, ServerClock

MONO0 = 1_000_000.0  # ~11.6 days of host uptime: what an old server shows
SERVER = 1_700_000_000.0  # server time minus the host's monotonic time (true offset)
US = 1e-6


class FakeTime:
    """Stands in for the `time` module inside clock.py."""

    def __init__(self, mono: float = MONO0, wall: float = SERVER) -> None:
        self.mono = mono
        self.wall = wall  # this host's wall clock minus its monotonic clock

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.mono + self.wall

    def server(self) -> float:
        """The server's true time now."""
        return self.mono + SERVER


class Sampler:
    """`SELECT UNIX_TIMESTAMP(NOW(6))` with controlled delays: each sample takes the
    next (out, back) pair; the server reads its clock between the two."""

    def __init__(self, ft: FakeTime, delays: Iterable[tuple[float, float]] = ()) -> None:
        self.ft = ft
        self.delays = list(delays)
        self.calls = 0
        self.fail = False

    def queue(self, *pairs: tuple[float, float]) -> None:
        self.delays += pairs

    async def __call__(self) -> float:
        self.calls += 1
        if self.fail:
            raise ConnectionError("server away")
        out, back = self.delays.pop(0) if self.delays else (0.0001, 0.0001)
        self.ft.mono += out
        value = self.ft.server()
        self.ft.mono += back
        return value


@pytest.fixture
def ft(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(clock_mod, "time", fake)
    return fake


def off_by(ft: FakeTime, clock: ServerClock) -> float:
    """How far the clock's now() is from the server's true time (signed)."""
    return clock.now() - ft.server()


def test_local_clock_is_the_hosts_with_no_error() -> None:
    c = LocalClock()
    assert isinstance(c, Clock)
    assert c.error == 0.0
    assert isinstance(ServerClock(Sampler(FakeTime())), Clock)


async def test_symmetric_delays_give_the_exact_offset_and_half_the_round_trip(
    ft: FakeTime,
) -> None:
    s = Sampler(ft, [(0.002, 0.002)] * 3)
    c = ServerClock(s, samples=3)
    assert not c.calibrated
    with pytest.raises(RuntimeError, match="not calibrated"):
        c.now()
    await c.calibrate()
    assert c.calibrated and c.calibrations == 1 and s.calls == 3
    assert abs(off_by(ft, c)) < US
    assert c.error == pytest.approx(0.002, abs=US)
    # offset is the server's time minus this host's wall clock
    assert c.offset == pytest.approx(SERVER - ft.wall, abs=US)


@pytest.mark.parametrize(("out", "back"), [(0.004, 0.0), (0.0, 0.004), (0.003, 0.001)])
async def test_asymmetric_delays_stay_within_the_error_bound(
    ft: FakeTime, out: float, back: float
) -> None:
    """The midpoint assumption is off by (out - back) / 2, never more than the bound."""
    c = ServerClock(Sampler(ft, [(out, back)]), samples=1)
    await c.calibrate()
    assert off_by(ft, c) == pytest.approx((out - back) / 2, abs=US)
    assert abs(off_by(ft, c)) <= c.error + US
    assert c.error == pytest.approx((out + back) / 2, abs=US)


async def test_the_shortest_round_trip_of_n_samples_is_kept(ft: FakeTime) -> None:
    # the middle sample is the shortest; each sample's asymmetry marks which was kept
    s = Sampler(ft, [(0.006, 0.0), (0.0006, 0.0004), (0.0, 0.003)])
    c = ServerClock(s, samples=3)
    await c.calibrate()
    assert s.calls == 3
    assert c.error == pytest.approx(0.0005, abs=US)
    assert off_by(ft, c) == pytest.approx(0.0001, abs=US)  # (0.0006 - 0.0004) / 2


async def test_the_error_grows_by_the_drift_between_samples(ft: FakeTime) -> None:
    c = ServerClock(Sampler(ft, [(0.001, 0.001)]), samples=1, drift=50e-6, refresh=1e9)
    await c.calibrate()
    e0 = c.error
    ft.mono += 100.0
    assert c.error == pytest.approx(e0 + 100.0 * 50e-6, abs=US)
    ft.mono += 900.0
    assert c.error == pytest.approx(e0 + 1000.0 * 50e-6, abs=US)


async def test_a_worse_calibration_keeps_the_better_estimate(ft: FakeTime) -> None:
    s = Sampler(ft, [(0.0005, 0.0005)])
    c = ServerClock(s, samples=1, refresh=1e9)
    await c.calibrate()
    ft.mono += 10.0  # the kept one's error grew to 1 ms + 0.5 ms of drift
    s.queue((0.0, 0.004))  # 2 ms half round trip, biased by 2 ms: worse
    await c.calibrate()
    assert c.calibrations == 2
    assert abs(off_by(ft, c)) < US  # the biased sample was not taken
    assert c.error == pytest.approx(0.0005 + 10 * 50e-6, abs=US)
    s.queue((0.0001, 0.0001))  # better than what is kept now: taken
    await c.calibrate()
    assert c.error == pytest.approx(0.0001, abs=US)


async def test_now_recalibrates_in_the_background_every_refresh_seconds(ft: FakeTime) -> None:
    s = Sampler(ft)
    c = ServerClock(s, samples=2, refresh=5.0)
    await c.calibrate()
    assert s.calls == 2
    ft.mono += 4.9
    c.now()
    assert c._task is None  # not due yet
    ft.mono += 0.2
    c.now()
    task = c._task
    assert task is not None
    c.now()
    assert c._task is task  # one refresh at a time
    await task
    assert c.calibrations == 2 and s.calls == 4
    assert c.error < 0.001
    c.now()
    assert c._task is task  # fresh again: no new refresh
    await c.close()


async def test_a_failed_refresh_keeps_the_estimate_and_its_error_grows(
    ft: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    s = Sampler(ft, [(0.001, 0.001)])
    c = ServerClock(s, samples=1, refresh=5.0, drift=50e-6)
    await c.calibrate()
    s.fail = True
    ft.mono += 6.0
    c.now()
    assert c._task is not None
    await c._task  # logged and swallowed, not raised
    assert c.calibrations == 1
    assert abs(off_by(ft, c)) < US
    assert c.error == pytest.approx(0.001 + 6.0 * 50e-6, abs=US)
    with pytest.raises(ConnectionError):
        await c.calibrate()  # an explicit calibrate raises what the sample raises
    await c.close()


async def test_a_refresh_that_keeps_the_old_sample_waits_refresh_seconds(ft: FakeTime) -> None:
    """The kept sample was taken on a quiet link; later samples are slower (a loaded
    server). Refreshes should still come every `refresh` seconds, not back to back."""
    s = Sampler(ft, [(0.0001, 0.0001)])
    c = ServerClock(s, samples=3, refresh=5.0, drift=50e-6)
    await c.calibrate()
    s.delays = [(0.001, 0.001)] * 1000  # 1 ms half round trips from now on
    ft.mono += 5.5
    started = 0
    for _ in range(100):  # a reader calls now() many times per second
        ft.mono += 0.01  # 1 s in all
        c.now()
        if c._task is not None and not c._task.done():
            started += 1
            await c._task
    await c.close()
    assert started == 1, f"{started} calibrations ({started * 3} queries) in one second"


def test_now_never_goes_back_when_a_calibration_lowers_the_offset(ft: FakeTime) -> None:
    async def scenario() -> list[float]:
        s = Sampler(ft, [(0.004, 0.0)])  # 2 ms bias: the estimate is 2 ms ahead
        c = ServerClock(s, samples=1, refresh=1e9)
        await c.calibrate()
        seen = [c.now()]
        ft.mono += 0.0005
        seen.append(c.now())
        s.queue((0.0001, 0.0001))  # exact: the offset drops by ~2 ms
        await c.calibrate()
        assert off_by(ft, c) >= -US  # held, not behind: now() waits for the truth
        for _ in range(40):
            ft.mono += 0.0001
            seen.append(c.now())
        # 4 ms later the estimate is the exact one again
        assert abs(off_by(ft, c)) < US
        return seen

    seen = asyncio.run(scenario())
    assert seen == sorted(seen)
    assert len(set(seen)) < len(seen)  # it did hold still for a while


async def test_now_stays_within_its_error_bound_while_held(ft: FakeTime) -> None:
    s = Sampler(ft, [(0.004, 0.0)])  # 2 ms half round trip, 2 ms ahead: within bound
    c = ServerClock(s, samples=1, refresh=1e9)
    await c.calibrate()
    assert abs(off_by(ft, c)) <= c.error + US
    c.now()
    s.queue((0.00005, 0.00005))
    await c.calibrate()
    held = c.now()
    assert held - ft.server() <= c.error + US, (held - ft.server(), c.error)


@pytest.mark.parametrize("skew", [0.2, -0.2])
async def test_a_skewed_host_is_warned_about_once(
    ft: FakeTime, caplog: pytest.LogCaptureFixture, skew: float
) -> None:
    ft.wall = SERVER + skew  # this host's wall clock is `skew` off the server's
    c = ServerClock(Sampler(ft), samples=1, warn_skew=0.1, where="db1")
    with caplog.at_level(logging.WARNING, logger="mvalve_async.clock"):
        await c.calibrate()
        ft.mono += 10
        await c.calibrate()
        await c.calibrate()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"{skew:+.3f} s off db1" in warnings[0].getMessage()
    assert c.offset == pytest.approx(-skew, abs=0.001)
    # the valve's time does not depend on the host's wall clock at all
    assert abs(off_by(ft, c)) < 0.001


async def test_a_host_within_the_threshold_is_not_warned_about(
    ft: FakeTime, caplog: pytest.LogCaptureFixture
) -> None:
    ft.wall = SERVER + 0.05
    c = ServerClock(Sampler(ft), samples=2, warn_skew=0.1)
    with caplog.at_level(logging.WARNING, logger="mvalve_async.clock"):
        await c.calibrate()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_wall_clock_step_changes_nothing(ft: FakeTime) -> None:
    c = ServerClock(Sampler(ft), samples=1, refresh=1e9)
    await c.calibrate()
    before = off_by(ft, c)
    ft.wall -= 1.0  # the host's clock steps back by a second
    assert off_by(ft, c) == pytest.approx(before, abs=US)
    assert c.offset == pytest.approx(SERVER - ft.wall, abs=0.001)


async def test_invalidate_recalibrates_on_the_next_now(ft: FakeTime) -> None:
    s = Sampler(ft, [(0.0001, 0.0001)])
    c = ServerClock(s, samples=1, refresh=60.0)
    await c.calibrate()
    ft.mono += 1.0
    c.invalidate()  # a reconnect, maybe to another server
    s.queue((0.001, 0.001))  # slower than the kept sample, yet it must be taken
    c.now()
    assert c._task is not None
    await c._task
    assert c.calibrations == 2
    assert c.error == pytest.approx(0.001, abs=US)
    await c.close()


async def test_invalidate_does_not_make_the_error_depend_on_uptime(ft: FakeTime) -> None:
    s = Sampler(ft, [(0.0001, 0.0001)])
    c = ServerClock(s, samples=1, refresh=60.0)
    await c.calibrate()
    c.invalidate()
    # every grant made before the refresh lands records entries `error` late: a
    # destination would wait that long for every reader
    assert c.error < 1.0, c.error


async def test_close_cancels_a_refresh_in_flight(ft: FakeTime) -> None:
    gate = asyncio.Event()
    s = Sampler(ft)

    async def slow() -> float:
        if c.calibrated:
            await gate.wait()
        return await s()

    c = ServerClock(slow, samples=1, refresh=1.0)
    await c.calibrate()
    ft.mono += 2.0
    c.now()
    task = c._task
    assert task is not None and not task.done()
    await c.close()
    assert task.cancelled()
    assert c.calibrations == 1
