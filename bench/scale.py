"""Scenario `scale`: many destinations, each with a backlog, throttled and not.

`DESTINATIONS` destinations x `PER_DEST` messages queued up front, drained by 4
reader processes sharing memcached: once with no rate at all (the baseline: the
unthrottled batched consume rate of the same run, same server, same processes),
once at `Rate(20, 1)` per destination. The ideal throttled drain is
(PER_DEST / 20 - 1) s (the first 20 of each destination go at once); with 1,000
destinations that asks for 20,000 msg/s, more than one 2-core server consumes, so
the figure that matters is throughput against the unthrottled run (target: at
least 0.8x), with 0 windows over the rate and 0 order inversions.

Per message of the throttled run: memcached ops, SQL statements (COM_QUERY
packets, a multi-statement packet counts once), reader CPU; the same for the
unthrottled run beside it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from mvalve_async import Message
from mvalve_async.pipe import Pipe
from mvalve_async.registry import make_queue
from mvalve_async.stores.memory import MemoryStore

from . import throttle
from .harness import US, Bench, Result, max_in_window, windows_over
from .plot import Timeline

DESTINATIONS, PER_DEST, N, PER, PROCS = 1000, 60, 20, 1.0, 4


async def run(b: Bench) -> Result:
    dests, per_dest = (50, 40) if b.quick else (DESTINATIONS, PER_DEST)
    total = dests * per_dest
    ideal = per_dest / N * PER - PER
    res = Result("scale", facts={
        "destinations": dests, "messages per destination": per_dest, "messages": total,
        "rate": f"{N}/{PER:g}s", "processes": PROCS, "ideal throttled drain s": ideal,
    })  # fmt: skip
    tables = b.tables("s")
    lanes = [tables.emergency[0], tables.timed[0], tables.normal[0]]
    pipe = Pipe(make_queue(b.queue_settings(tables)), MemoryStore(), create=True)
    await pipe.connect()
    msgs = [Message(f"d{i % dests:04d}", {"seq": i}) for i in range(total)]
    try:
        for rep in range(b.repeat):
            got: dict[str, dict[str, Any]] = {}
            for side in b.order(rep):
                for name in [*lanes, tables.dead]:
                    await b.sql(f"TRUNCATE TABLE `{name}`")
                for i in range(0, total, 5000):
                    await pipe.writer().insert_many(msgs[i : i + 5000])
                cfg = {"url": b.queue_url(tables), "batch": throttle.BATCH,
                       "store": b.store_url(f"mvb{b.run_id}s{rep}{side}"),
                       "n": N if side == "ours" else None, "per": PER}  # fmt: skip
                outs, t_go = await throttle._drain(b, cfg, PROCS, lanes, 600)
                got[side] = _figures(outs, t_go, total)
                if side == "ours":
                    res.timelines = [Timeline(
                        f"scale, ours: {dests} destinations x {per_dest} at {N}/{PER:g}s, "
                        f"{PROCS} processes (run {rep + 1})",
                        [(r[0], r[2]) for o in outs for r in o["rows"]],
                        {f"d{i:04d}": (N, PER) for i in range(dests)}, start=t_go,
                    )]  # fmt: skip
            _account(res, got["ours"], got["baseline"], ideal)
            b.say(f"scale: repeat {rep + 1}/{b.repeat} done")
    finally:
        await pipe.close()
    return res


def _figures(outs: list[dict[str, Any]], t_go: float, total: int) -> dict[str, Any]:
    rows = [r for o in outs for r in o["rows"]]
    seqs = [r[1] for r in rows]
    if len(seqs) != total or len(set(seqs)) != total:
        raise AssertionError(f"{len(seqs)} deliveries of {len(set(seqs))} messages, not {total}")
    by_dest: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    for r in rows:
        by_dest[r[0]].append((r[2], r[4], r[1]))
    over = worst = inversions = 0
    for items in by_dest.values():
        ats = sorted(at for at, _, _ in items)
        over += windows_over(ats, PER, N)
        worst = max(worst, max_in_window(ats, PER))
        top = -1
        for _, _, seq in sorted(items):
            inversions += seq < top
            top = max(top, seq)
    drain = max(r[3] for r in rows) - t_go
    return {
        "drain": drain, "rate": total / drain, "over": over, "worst": worst,
        "inversions": inversions, "ops": sum(o["ops"] for o in outs) / total,
        "sql": sum(o["statements"] for o in outs) / total,
        "cpu": sum(o["cpu"] for o in outs) * US / total,
        "retries": sum(o["retries"] for o in outs) / total,
    }  # fmt: skip


def _account(res: Result, ours: dict[str, Any], base: dict[str, Any], ideal: float) -> None:
    c = res.case("throughput, throttled vs unthrottled", "msg/s", "no rate, same run")
    c.ours.append(ours["rate"])
    c.baseline.append(base["rate"])
    c.add("ours drain s", ours["drain"])
    c.add("baseline drain s", base["drain"])
    c.add("ours drain / ideal", ours["drain"] / ideal if ideal > 0 else float("nan"))
    c.add("windows over the rate", ours["over"])
    c.add(f"busiest {PER:g} s window (limit {N})", ours["worst"])
    c.add("order inversions", ours["inversions"])
    c = res.case("cost per message", "µs CPU", "no rate, same run")
    c.ours.append(ours["cpu"])
    c.baseline.append(base["cpu"])
    for key, label in (("ops", "memcached ops/msg"), ("sql", "SQL statements/msg"),
                       ("retries", "memcached cas retries/msg")):  # fmt: skip
        c.add(f"ours {label}", ours[key])
        c.add(f"baseline {label}", base[key])
