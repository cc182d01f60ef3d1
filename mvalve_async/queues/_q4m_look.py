"""Looking at a q4m queue: `scan`, `stats` and `peek` without claiming anything.

They run plain SELECTs on the shared pool, never on an owner (after a
`queue_wait` an owner's SELECTs see nothing but its own row). A pool connection
sees every row nobody owns and no owned row: this process's leases are added
from its owners, with their process-local lease ends; rows other processes own
are invisible. Q4M cannot ORDER BY, so the timed lane's order is rebuilt here.
"""

from __future__ import annotations

import heapq
from typing import Any

from ..interfaces import Found, Lane, Lease, QueueStats, Scan
from ..urls import Tables
from ._common import US, peek_item, tally, to_us
from ._mysql import MySQLPool, count_dead
from ._q4m_owners import Owners

__all__ = ["peek", "scan", "stats"]


async def scan(db: MySQLPool, tables: Tables, now: float) -> Scan:
    """Every destination with rows nobody owns (a full read: Q4M has no index),
    with its count and, for timed rows, its earliest ready; whether emergency rows
    are due; the earliest future ready. `mark` says whether rows without a
    destination key (written before `dkey` existed) were seen."""
    now_us = to_us(now)

    async def run(conn: Any) -> Scan:
        found: dict[str, Found] = {}
        future: list[int] = []
        emergency = legacy = False
        async with conn.cursor() as cur:
            for lane, table in tables.all():
                if lane is Lane.EMERGENCY:
                    await cur.execute(f"SELECT ready FROM `{table}`")
                    emergency = emergency or any(int(r) <= now_us for (r,) in await cur.fetchall())
                    continue
                await cur.execute(f"SELECT destination, dkey, ready FROM `{table}`")
                for dest, key, ready in await cur.fetchall():
                    at = int(ready) / US if int(ready) > now_us else 0.0
                    if at:
                        future.append(int(ready))
                    f = found.setdefault(dest, Found(0, at))
                    f.rows += 1
                    f.ready = min(f.ready, at)
                    legacy = legacy or not int(key)
        return Scan(found, emergency, min(future) / US if future else None, legacy, True)

    return await db.run(run)


async def stats(db: MySQLPool, tables: Tables, owners: Owners, now: float) -> QueueStats:
    """Queued rows as the server shows them; `leased`: this process's leases."""
    queued = {lane: 0 for lane in Lane}
    leased = {lane: 0 for lane in Lane}
    by_dest: dict[str, dict[str, int]] = {}
    for lane, table in tables.all():
        for dest, count in await db.fetch(
            f"SELECT destination, COUNT(*) FROM `{table}` GROUP BY destination"
        ):
            queued[lane] += int(count)
            tally(by_dest, dest, str(lane), int(count))
    for lease, _ in owners.leases():
        leased[lease.lane] += 1
        tally(by_dest, lease.destination, "leased", 1)
    dead = await count_dead(db, tables.dead, by_dest)
    now_us, future = to_us(now), []
    for table in tables.timed:
        future += [int(r) for (r,) in await db.fetch(f"SELECT ready FROM `{table}`")]
    due = min((r for r in future if r > now_us), default=None)
    return QueueStats(queued, leased, dead, by_dest, due / US if due is not None else None)


def _peek_lease(x: Lease, until: float) -> dict[str, Any]:
    return peek_item(x.lane, x.table, x.id, x.destination, x.ready, x.deliveries, until, x.blob)


async def peek(
    db: MySQLPool, tables: Tables, owners: Owners, limit: int, lane: Lane | None
) -> list[dict[str, Any]]:
    """Emergency and normal: FIFO (tables merged by id); timed: by (ready, id)."""
    out: list[dict[str, Any]] = []
    local = owners.leases()
    for row_lane in Lane if lane is None else (lane,):
        want = limit - len(out)
        if want <= 0:
            break
        mine = [_peek_lease(x, until) for x, until in local if x.lane is row_lane]
        if row_lane is Lane.TIMED:
            out.extend(await _peek_timed(db, tables, mine, want))
            continue
        lists = [sorted(mine, key=lambda r: int(r["id"]))]
        for table in tables.lane(row_lane):
            rows = await db.fetch(
                f"SELECT id, destination, deliveries, message FROM `{table}` LIMIT %s",
                (int(want),),
            )
            lists.append([
                peek_item(row_lane, table, int(rid), dest, None, int(done), 0.0, bytes(blob))
                for rid, dest, done, blob in rows
            ])  # fmt: skip
        out.extend(list(heapq.merge(*lists, key=lambda r: int(r["id"])))[:want])
    return out


async def _peek_timed(
    db: MySQLPool, tables: Tables, mine: list[dict[str, Any]], want: int
) -> list[dict[str, Any]]:
    """Q4M cannot ORDER BY: read (ready, id) of every timed row, then the
    `want` first rows one by one (a row claimed meanwhile is skipped)."""
    keys: list[tuple[float, int, str | dict[str, Any]]] = [
        (float(r["ready"] or 0.0), int(r["id"]), r) for r in mine
    ]
    for table in tables.timed:
        keys.extend(
            (int(ready) / US, int(rid), table)
            for rid, ready in await db.fetch(f"SELECT id, ready FROM `{table}`")
        )
    keys.sort(key=lambda k: (k[0], k[1]))
    out: list[dict[str, Any]] = []
    for ready, rid, source in keys:
        if len(out) >= want:
            break
        if isinstance(source, dict):
            out.append(source)
            continue
        rows = await db.fetch(
            f"SELECT destination, deliveries, message FROM `{source}` WHERE id = %s LIMIT 1",
            (rid,),
        )
        if rows:
            dest, done, blob = rows[0]
            out.append(peek_item(Lane.TIMED, source, rid, dest, ready, int(done), 0.0, bytes(blob)))
    return out
