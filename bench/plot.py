"""Per-destination delivery rate against its limit, drawn to a PNG (`--plot FILE.png`).

The input is generic, so that any scenario can be drawn: one `Timeline` per panel,

    Timeline(
        title="throttle: 10 destinations, 4 processes",
        rows=[("dest-0", 1733461200.123), ...],  # (destination, time of delivery), any order
        limits={"dest-0": (20, 1.0), ...},       # n deliveries per `per` s; None: no limit
        start=t_go,                              # 0 on the x axis (default: the first row)
    )
    render([timeline, ...], "out.png")           # panels stacked, one per timeline

A destination missing from `limits` is drawn without a limit line, as one mapped to
None. What is drawn, for each destination with a limit `n/per`: the number of its
deliveries in the trailing window (t - per, t], divided by `per`, against t: the
rate as the limit counts it, an exact step line (it changes only at a delivery and
`per` after it); the limit `n / per` is a dashed line. A destination whose line never
rises above the limit kept its rate in every window, the promise of `Rate(n, per)`.
The legend gives each destination's peak: the most deliveries in any window of its
period, against `n`. A destination without a limit is counted over 1 s windows.
Past `MAX_LEGEND` destinations, the lines are thin and grey and the legend gives only
the highest peak (a scale scenario draws as a band, not as a thousand entries).

`render` needs matplotlib (`pip install 'mvalve-async[plot]'`); importing this module
does not, so the harness can check for it before a long run (`require`).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAX_LEGEND", "PlotUnavailable", "Timeline", "peak", "render", "require", "trailing_rate",
]  # fmt: skip

MAX_LEGEND = 12  # destinations named in a panel's legend; past that, a grey band
INSTALL = "pip install 'mvalve-async[plot]' (in a checkout: pip install -e '.[plot]')"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


@dataclass
class Timeline:
    """One panel: deliveries as (destination, time) rows, and each destination's
    limit as (n, per) (None or absent: unlimited)."""

    title: str
    rows: Sequence[tuple[str, float]]
    limits: Mapping[str, tuple[int, float] | None] = field(default_factory=dict)
    start: float | None = None

    def by_destination(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = defaultdict(list)
        for dest, at in self.rows:
            out[dest].append(at)
        return {d: sorted(ts) for d, ts in sorted(out.items())}


def require() -> None:
    """Raise PlotUnavailable, with the command that installs it, if matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise PlotUnavailable(f"plotting needs matplotlib: {INSTALL}") from exc


def trailing_rate(times: Sequence[float], per: float) -> tuple[list[float], list[float]]:
    """The step function "deliveries in (t - per, t] / per" of sorted `times`, exactly:
    (xs, ys) with ys[i] holding from xs[i] to xs[i + 1] (matplotlib's steps-post). It
    starts at 0 at the first delivery's time and ends at 0, `per` after the last."""
    if not times:
        return [], []
    xs = sorted(set(times) | {t + per for t in times})
    ys = []
    for x in xs:  # deliveries in (x - per, x]
        ys.append((bisect.bisect_right(times, x) - bisect.bisect_right(times, x - per)) / per)
    return [times[0], *xs], [0.0, *ys]


def peak(times: Sequence[float], per: float) -> int:
    """The most of sorted `times` in any half-open window [t, t + per)."""
    best = lo = 0
    for hi, t in enumerate(times):
        while times[lo] <= t - per:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def render(timelines: Sequence[Timeline], path: str, *, dpi: int = 120) -> None:
    """Draw `timelines` (one panel each) to the PNG `path`."""
    require()
    from matplotlib.figure import Figure

    if not timelines:
        raise ValueError("nothing to draw: no timeline")
    fig = Figure(figsize=(12, 4.2 * len(timelines)), layout="constrained")
    axes = fig.subplots(len(timelines), 1, squeeze=False)[:, 0]
    for ax, timeline in zip(axes, timelines, strict=True):
        _panel(ax, timeline)
    fig.savefig(path, dpi=dpi)


def _panel(ax: Any, timeline: Timeline) -> None:
    series = timeline.by_destination()
    t0 = timeline.start if timeline.start is not None else min(t for _, t in timeline.rows)
    many = len(series) > MAX_LEGEND
    colors = [f"C{i % 10}" for i in range(len(series))]
    worst: tuple[float, str] = (-1.0, "")
    top = 0.0  # the highest line, limits included: the y axis goes a quarter above
    limit_lines: set[tuple[int, float] | None] = set()
    for (dest, absolute), color in zip(series.items(), colors, strict=True):
        times = [t - t0 for t in absolute]  # small numbers: t + per - per stays t
        limit = timeline.limits.get(dest)
        per = limit[1] if limit else 1.0
        xs, ys = trailing_rate(times, per)
        most = peak(times, per)
        if limit:
            label = f"{dest}: peak {most} {'≤' if most <= limit[0] else '>'} {limit[0]}"
        else:
            label = f"{dest}: peak {most} in 1 s (no limit)"
        share = most / limit[0] if limit else 0.0
        if share > worst[0]:
            worst = (share, label)
        ax.plot(
            xs, ys, drawstyle="steps-post",
            color="0.55" if many else color, linewidth=0.6 if many else 1.1,
            alpha=0.5 if many else 0.85, label=None if many else label,
        )  # fmt: skip
        limit_lines.add(limit)
        top = max(top, *ys, limit[0] / limit[1] if limit else 0.0)
    for limit in sorted(limit_lines, key=lambda lim: (lim is None, lim)):
        if limit is None:
            continue
        n, per = limit
        ax.axhline(n / per, color="red", linestyle="--", linewidth=1.6,
                   label=f"limit {n}/{per:g}s = {n / per:g}/s")  # fmt: skip
    if many:
        ax.plot([], [], color="0.55", label=f"{len(series)} destinations")
        ax.plot([], [], color="none", label=f"highest, {worst[1]}")
    ax.set_title(timeline.title, loc="left", fontsize=11)
    ax.set_xlabel("seconds since start")
    pers = sorted({lim[1] for lim in timeline.limits.values() if lim})
    window = f"{pers[0]:g} s" if len(pers) == 1 else "its limit's period"
    ax.set_ylabel(f"deliveries per second\n(trailing window: {window})")
    ax.set_xlim(left=0)
    ax.set_ylim(0, top * 1.25 or 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
