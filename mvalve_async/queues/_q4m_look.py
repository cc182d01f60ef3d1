"""Looking at a q4m queue: `poll`, `stats` and `peek` without claiming anything.

They run plain SELECTs on the shared pool, never on an owner (after a
`queue_wait` an owner's SELECTs see nothing but its own row). A pool connection
sees every row nobody owns and no owned row: this process's leases are added
from its owners, with their process-local lease ends; rows other processes own
are invisible. Q4M cannot ORDER BY, so the timed lane's order is rebuilt here.
"""

from __future__ import annotations

import heapq
from typing import Any

from ..interfaces import Lane, Lease, QueueStats
from ..urls import Tables
from ._common import US, peek_item, tally, to_us
from ._mysql import MySQLPool, count_dead
from ._q4m_owners import Owners

__all__ = ["peek", "scan", "stats"]

_SCAN = 1000  # `ready` values read per table by poll to find the next due time


async def scan(db: MySQLPool, tables: Tables, now: float) -> tuple[bool, float | None]:
    """(a row is claimable, the earliest future ready): per table the first
    `_SCAN` ready values in FIFO order (exactly re-checked past that), so with
    more future rows than that the next due time is an upper bound."""
    now_us = to_us(now)

    async def run(conn: Any) -> tuple[bool, float | None]:
        ready, future = False, list[int]()
        async with conn.cursor() as cur:
            for _, table in tables.all():
                await cur.execute(f"SELECT ready FROM `{table}` LIMIT %s", (_SCAN + 1,))
                values = [int(r[0]) for r in await cur.fetchall()]
                if any(v <= now_us for v in values):
                    ready = True
                elif len(values) > _SCAN and not ready:
                    await cur.execute(
                        f"SELECT id FROM `{table}` WHERE ready <= %s LIMIT 1", (now_us,)
                    )
                    ready = bool(await cur.fetchall())
                future.extend(v for v in values if v > now_us)
        return ready, (min(future) / US if future else None)

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
    _, next_due = await scan(db, tables, now)
    return QueueStats(queued, leased, dead, by_dest, next_due)


def _peek_lease(x: Lease, until: float) -> dict[str, Any]:
    return peek_item(
        x.lane, x.table, x.id, x.destination, x.ready, x.reserved, x.deliveries, until, x.blob
    )


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
                peek_item(row_lane, table, int(rid), dest, None, False, int(done),
                          0.0, bytes(blob))
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
            "SELECT destination, reserved, deliveries, message "
            f"FROM `{source}` WHERE id = %s LIMIT 1",
            (rid,),
        )
        if rows:
            dest, reserved, done, blob = rows[0]
            out.append(
                peek_item(Lane.TIMED, source, rid, dest, ready, bool(reserved),
                          int(done), 0.0, bytes(blob))
            )  # fmt: skip
    return out
