"""bench/plot.py: the rate it draws, the PNG it writes, and the error without matplotlib."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from bench import run as bench_run
from bench.plot import MAX_LEGEND, PlotUnavailable, Timeline, peak, render, require, trailing_rate


def _at(xs: list[float], ys: list[float], t: float) -> float:
    """The step function's value at t (steps-post: ys[i] holds from xs[i])."""
    value = 0.0
    for x, y in zip(xs, ys, strict=True):
        if x <= t:
            value = y
    return value


def test_trailing_rate_counts_the_last_period_exactly() -> None:
    times = [0.0, 0.25, 0.5, 1.0, 1.75]
    xs, ys = trailing_rate(times, 1.0)
    # deliveries in (t - 1, t]: at 1.0 the one at 0.0 has just left the window
    expected = {0.0: 1, 0.3: 2, 0.5: 3, 0.99: 3, 1.0: 3, 1.25: 2, 1.5: 1, 1.8: 2, 2.0: 1, 2.75: 0}
    for t, n in expected.items():
        assert _at(xs, ys, t) == n, t
    assert ys[-1] == 0 and xs[-1] == pytest.approx(2.75)
    per2 = trailing_rate(times, 2.0)[1]
    assert max(per2) == 2.5  # 5 in (−0.25, 1.75]: per second over a 2 s window
    assert trailing_rate([], 1.0) == ([], [])


def test_peak_counts_half_open_windows() -> None:
    assert peak([0.0, 0.5, 1.0, 1.5], 1.0) == 2  # [0, 1) holds 0 and 0.5
    assert peak([0.0, 0.5, 0.999, 1.5], 1.0) == 3
    assert peak([], 1.0) == 0


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def test_render_draws_one_panel_per_timeline(tmp_path: Path) -> None:
    few = Timeline(
        "two limited destinations and an unlimited one",
        [("a", 100.0 + i * 0.05) for i in range(40)] + [("b", 100.0 + i * 0.2) for i in range(10)]
        + [("free", 100.5)] * 30,
        {"a": (20, 1.0), "b": (5, 2.0), "free": None},
        start=100.0,
    )  # fmt: skip
    many = Timeline(
        "a band: more destinations than the legend names",
        [(f"d{i}", i * 0.01 + k * 0.1) for i in range(MAX_LEGEND + 5) for k in range(12)],
        {f"d{i}": (10, 1.0) for i in range(MAX_LEGEND + 5)},
    )  # fmt: skip
    out = tmp_path / "plot.png"
    render([few, many], str(out), dpi=50)
    width, height = _png_size(out)
    assert (width, height) == (12 * 50, round(2 * 4.2 * 50))
    with pytest.raises(ValueError, match="no timeline"):
        render([], str(tmp_path / "none.png"))


def test_without_matplotlib_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    with pytest.raises(PlotUnavailable, match=r"pip install 'mvalve-async\[plot\]'"):
        require()
    with pytest.raises(PlotUnavailable):
        render([Timeline("t", [("a", 1.0)])], str(tmp_path / "p.png"))
    # the bench checks before it runs anything (no server is asked: none is needed here)
    with pytest.raises(SystemExit, match=r"--plot: plotting needs matplotlib: pip install"):
        bench_run.main(["--scenarios", "throttle", "--plot", str(tmp_path / "p.png")])


def test_plot_needs_a_scenario_that_draws(tmp_path: Path) -> None:
    with pytest.raises(
        SystemExit, match="--plot draws the fairness and peer and scale and throttle scenarios"
    ):
        bench_run.main(["--scenarios", "writer", "--plot", str(tmp_path / "p.png")])
