"""The innodb dialect: plain InnoDB tables, leases claimed with SKIP LOCKED.

A claim is one short READ COMMITTED transaction: `SELECT ... FOR UPDATE SKIP
LOCKED` per lane, then one `UPDATE` setting the lease; nothing is held while
user code runs. Acks are one `DELETE ... WHERE lease_token = ? AND id IN (...)`
per table, sent with the next claim. Moves and dead letters are `INSERT ...
SELECT` + `DELETE` guarded by the lease token, so repeating them after a lost
connection is safe; like reschedules, each is one transaction in one round trip.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Iterable, Sequence
from typing import Any

from ..interfaces import Lane, Lease, QueueStats, Row
from ..schema import render
from ..urls import QueueSettings
from ._common import US, peek_item, row_args, schema_sql, tally, to_us
from ._mysql import MySQLPool, count_dead, drop_tables, purge_lanes, read_dead_letters

__all__ = ["InnoDBQueue"]


def _id_list(ids: Iterable[int]) -> str:
    """Ids inlined as SQL (integers only), for `id IN (...)`."""
    return ",".join(str(int(i)) for i in ids)


def _held(items: Sequence[Lease]) -> str:
    """WHERE clause for leased rows of one table (integers inlined): still held under
    the token each was claimed with. One claim's rows share a token; rows of
    several claims (acks of batch-1 reads) are matched pairwise, in one statement."""
    ids = _id_list(x.id for x in items)
    tokens = {x.token for x in items}
    if len(tokens) == 1:
        return f"lease_token = {int(tokens.pop())} AND id IN ({ids})"
    pairs = ",".join(f"({int(x.id)},{int(x.token)})" for x in items)
    return f"id IN ({ids}) AND (id, lease_token) IN ({pairs})"


def _by_table(leases: Iterable[Lease]) -> dict[str, list[Lease]]:
    out: dict[str, list[Lease]] = {}
    for lease in leases:
        out.setdefault(lease.table, []).append(lease)
    return out


def _deletes(leases: Iterable[Lease]) -> list[str]:
    """The acks of `leases`: one DELETE per table."""
    return [f"DELETE FROM `{t}` WHERE {_held(items)}" for t, items in _by_table(leases).items()]


async def _drain(cur: Any) -> None:
    """Read the remaining results of a multi-statement query (or the next one fails)."""
    while await cur.nextset():
        pass


class InnoDBQueue:
    name = "innodb"
    dialect = "innodb"

    def __init__(self, settings: QueueSettings) -> None:
        self.settings = settings
        self.tables = settings.tables
        self.db = MySQLPool(settings, multi_statements=True)
        self._lane_of = {table: lane for lane, table in self.tables.all()}
        self._lanes = self.tables.all()
        self._rank = [list(Lane).index(lane) for lane, _ in self._lanes]  # per table
        self._poll_sql = self._build_poll()
        self._claim_sql = self._claim_sql_text()

    def __repr__(self) -> str:
        return f"InnoDBQueue({self.settings.safe_url()!r})"

    async def connect(self) -> None:
        await self.db.connect()

    async def close(self) -> None:
        await self.db.close()

    def schema_sql(self) -> str:
        return schema_sql(self.dialect, self.tables)

    async def create_schema(self) -> None:
        await self.db.script(render(self.dialect, self.tables))

    async def drop_schema(self) -> None:
        await drop_tables(self.db, self.tables)

    # -- writing --------------------------------------------------------------

    async def insert(self, lane: Lane, rows: Sequence[Row]) -> None:
        if not rows:
            return
        table = random.choice(self.tables.lane(lane))
        if lane is Lane.TIMED:
            sql = (
                f"INSERT INTO `{table}` (destination, ready, reserved, message, created) "
                "VALUES (%s, %s, %s, %s, %s)"
            )
        else:
            sql = f"INSERT INTO `{table}` (destination, message, created) VALUES (%s, %s, %s)"
        await self.db.insert(sql, row_args(lane, rows))

    # -- claiming -------------------------------------------------------------

    def _claim_sql_text(self) -> str:
        """One statement over every lane table (a round trip, not one per table):
        each part locks its first rows with SKIP LOCKED; the client keeps the
        best `limit` by (lane, ready, id) and the rest unlock at COMMIT. The numbers
        come packed in one text column: every result column costs the client a
        column definition to parse, and that was the claim's largest CPU cost."""
        parts = []
        for k, (lane, table) in enumerate(self.tables.all()):
            if lane is Lane.TIMED:
                parts.append(
                    f"(SELECT CONCAT_WS(' ', {k}, id, deliveries, created, ready, reserved), "
                    f"destination, message FROM `{table}` "
                    "WHERE ready <= %(now)s AND lease_until <= %(now)s "
                    "ORDER BY ready, created, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
                )
            else:
                parts.append(
                    f"(SELECT CONCAT_WS(' ', {k}, id, deliveries, created), "
                    f"destination, message FROM `{table}` WHERE lease_until <= %(now)s "
                    "ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
                )
        return " UNION ALL ".join(parts)

    async def claim(self, limit: int, now: float, lease_seconds: float) -> list[Lease]:
        return await self.claim_settling((), limit, now, lease_seconds)

    async def claim_settling(
        self, acks: Sequence[Lease], limit: int, now: float, lease_seconds: float
    ) -> list[Lease]:
        """`ack(acks)` and `claim(...)` in one transaction and the same round trips.
        Readers use it: acks go out with the next claim, so they cost no commit of
        their own, and acked rows are gone before the claim's SELECT (leased rows
        left at the head of a table are rows every claim must step over)."""
        deletes = _deletes(acks)
        now_us, until = to_us(now), to_us(now + lease_seconds)
        lanes, rank = self._lanes, self._rank

        async def work(conn: Any) -> list[Lease]:
            # Two round trips: START TRANSACTION + the SELECT ... SKIP LOCKED, then
            # the lease UPDATEs + COMMIT (the pool allows multi-statements for this).
            token = secrets.randbits(62) + 1
            async with conn.cursor() as cur:
                head = "".join(f"{d.replace('%', '%%')}; " for d in deletes)
                await cur.execute(
                    "START TRANSACTION; " + head + self._claim_sql, {"now": now_us, "limit": limit}
                )
                for _ in range(1 + len(deletes)):
                    await cur.nextset()
                found = list(await cur.fetchall())
                await _drain(cur)
                if not found:
                    await cur.execute("COMMIT")
                    return []
                # (k, id, deliveries, created[, ready, reserved]), destination, message
                rows = [([int(x) for x in nums.split()], dest, blob) for nums, dest, blob in found]
                # Priority by lane; FIFO within a lane (timed: by ready, then insertion).
                # Several tables of one lane interleave by id, so none starves.
                rows.sort(
                    key=lambda r: (
                        (rank[r[0][0]], r[0][4], r[0][3], r[0][1])
                        if len(r[0]) > 4
                        else (rank[r[0][0]], 0, 0, r[0][1])
                    )
                )
                rows = rows[:limit]
                by_table: dict[str, list[int]] = {}
                for nums, _, _ in rows:
                    by_table.setdefault(lanes[nums[0]][1], []).append(nums[1])
                updates = [
                    f"UPDATE `{table}` SET lease_until = {int(until)}, "
                    f"lease_token = {int(token)}, deliveries = deliveries + 1 "
                    f"WHERE id IN ({_id_list(ids)})"
                    for table, ids in by_table.items()
                ]
                await cur.execute("; ".join([*updates, "COMMIT"]))
                await _drain(cur)
            return [
                Lease(
                    lanes[nums[0]][0],
                    lanes[nums[0]][1],
                    nums[1],
                    dest,
                    bytes(blob),
                    nums[2] + 1,
                    nums[4] / US if len(nums) > 4 else None,
                    len(nums) > 4 and bool(nums[5]),
                    token,
                    created=nums[3],
                )
                for nums, dest, blob in rows
            ]

        return await self.db.run(work)

    async def ack(self, leases: Sequence[Lease]) -> None:
        deletes = _deletes(leases)
        if not deletes:
            return
        # One round trip and one commit, however many claims and tables are settled.
        sql = deletes[0] if len(deletes) == 1 else "; ".join(["BEGIN", *deletes, "COMMIT"])

        async def run(conn: Any) -> None:
            async with conn.cursor() as cur:
                await cur.execute(sql)
                await _drain(cur)

        await self.db.run(run)

    async def release(self, lease: Lease, delay: float = 0.0) -> None:
        until = to_us(time.time() + delay) if delay > 0 else 0
        await self.db.execute(
            f"UPDATE `{lease.table}` SET lease_until = %s, lease_token = 0 "
            "WHERE id = %s AND lease_token = %s",
            (until, lease.id, lease.token),
        )

    async def move(self, lease: Lease, ready: float, reserved: bool) -> None:
        deliveries = 0 if reserved else lease.deliveries
        if lease.lane is Lane.TIMED:  # stays in its table: keeps its id, hence its place
            await self.db.execute(
                f"UPDATE `{lease.table}` SET ready = %s, reserved = %s, deliveries = %s, "
                "lease_until = 0, lease_token = 0 WHERE id = %s AND lease_token = %s",
                (to_us(ready), int(reserved), deliveries, lease.id, lease.token),
            )
            return
        target = random.choice(self.tables.timed)
        # The DELETE needs no check of the INSERT's count: both match only while the
        # row is held under this lease's token (tokens are never reused).
        await self.db.transaction([
            (f"INSERT INTO `{target}` (destination, ready, reserved, message, created, "
             f"deliveries) SELECT destination, %s, %s, message, created, %s "
             f"FROM `{lease.table}` WHERE id = %s AND lease_token = %s",
             (to_us(ready), int(reserved), deliveries, lease.id, lease.token)),
            (f"DELETE FROM `{lease.table}` WHERE id = %s AND lease_token = %s",
             (lease.id, lease.token)),
        ])  # fmt: skip

    async def shift(self, destination: str, after: float, delta: float) -> int:
        total = 0
        for table in self.tables.timed:
            total += await self.db.execute(
                f"UPDATE `{table}` SET ready = ready + %s "
                "WHERE destination = %s AND reserved = 1 AND ready > %s",
                (to_us(delta), destination, to_us(after)),
            )
        return total

    async def reschedule(self, destination: str, moves: Sequence[tuple[int, float, float]]) -> int:
        now_us = to_us(time.time())
        counts = await self.db.transaction([
            (f"UPDATE `{table}` SET ready = %s WHERE destination = %s "
             "AND reserved = 1 AND created = %s AND lease_until <= %s",
             (to_us(new), destination, int(created), now_us))
            for created, _old, new in moves
            for table in self.tables.timed
        ])  # fmt: skip
        return sum(counts)

    async def dead(self, leases: Sequence[Lease], reason: str) -> None:
        groups = _by_table(leases)
        if not groups:
            return
        died = to_us(time.time())
        statements: list[tuple[str, Any]] = []
        for table, items in groups.items():
            held = _held(items)
            statements += [
                (f"INSERT INTO `{self.tables.dead}` (lane, destination, message, reason, "
                 f"deliveries, died_at) SELECT %s, destination, message, %s, deliveries, %s "
                 f"FROM `{table}` WHERE {held}",
                 (str(self._lane_of[table]), reason[:255], died)),
                (f"DELETE FROM `{table}` WHERE {held}", None),
            ]  # fmt: skip
        await self.db.transaction(statements)

    # -- looking --------------------------------------------------------------

    def _build_poll(self) -> str:
        exists = []
        for lane, table in self.tables.all():
            due = "ready <= %(now)s AND " if lane is Lane.TIMED else ""
            exists.append(f"EXISTS(SELECT 1 FROM `{table}` WHERE {due}lease_until <= %(now)s)")
        mins = [f"(SELECT MIN(ready) FROM `{t}` WHERE ready > %(now)s)" for t in self.tables.timed]
        return f"SELECT {' OR '.join(exists)}, {', '.join(mins)}"

    async def poll(self, now: float) -> tuple[bool, float | None]:
        rows = await self.db.fetch(self._poll_sql, {"now": to_us(now)})
        ready, *mins = rows[0]
        future = [m for m in mins if m is not None]
        return bool(ready), (min(future) / US if future else None)

    async def stats(self, now: float) -> QueueStats:
        now_us = to_us(now)
        queued = {lane: 0 for lane in Lane}
        leased = {lane: 0 for lane in Lane}
        by_dest: dict[str, dict[str, int]] = {}
        for lane, table in self.tables.all():
            rows = await self.db.fetch(
                "SELECT destination, SUM(lease_until > %s AND lease_token <> 0), COUNT(*) "
                f"FROM `{table}` GROUP BY destination",
                (now_us,),
            )
            for dest, n_leased, total in rows:
                n_leased, total = int(n_leased or 0), int(total)
                leased[lane] += n_leased
                queued[lane] += total - n_leased
                tally(by_dest, dest, str(lane), total - n_leased)
                tally(by_dest, dest, "leased", n_leased)
        dead = await count_dead(self.db, self.tables.dead, by_dest)
        _, next_due = await self.poll(now)
        return QueueStats(queued, leased, dead, by_dest, next_due)

    async def peek(self, limit: int = 20, lane: Lane | None = None) -> list[dict[str, Any]]:
        """Plain SELECTs (autocommit, READ COMMITTED): no locks, no lease changes."""
        out: list[dict[str, Any]] = []
        for row_lane in Lane if lane is None else (lane,):
            if len(out) >= limit:
                break
            timed = row_lane is Lane.TIMED
            rows: list[tuple[Any, ...]] = []
            for table in self.tables.lane(row_lane):
                extra, order = ("ready, reserved", "ready, id") if timed else ("NULL, 0", "id")
                rows.extend(
                    (table, *r)
                    for r in await self.db.fetch(
                        f"SELECT id, destination, {extra}, deliveries, lease_until, message "
                        f"FROM `{table}` ORDER BY {order} LIMIT %s",
                        (int(limit),),
                    )
                )
            rows.sort(key=lambda r: (r[3] or 0, r[1]))  # (ready, id)
            for table, rid, dest, ready, reserved, deliveries, until, blob in rows[
                : limit - len(out)
            ]:
                out.append(
                    peek_item(row_lane, table, int(rid), dest,
                              ready / US if ready is not None else None, bool(reserved),
                              int(deliveries), until / US, bytes(blob))
                )  # fmt: skip
        return out

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        return await read_dead_letters(self.db, self.tables.dead, limit, by_id=True)

    async def requeue_dead(self, ids: Sequence[int] | None = None) -> int:
        dead = self.tables.dead
        where = "" if ids is None else f" AND id IN ({_id_list(ids) or 0})"
        now_us = to_us(time.time())

        statements: list[tuple[str, Any]] = []
        for lane in Lane:
            table = random.choice(self.tables.lane(lane))
            ready = ("ready, ", "%s, ") if lane is Lane.TIMED else ("", "")
            args: tuple[Any, ...] = (now_us, str(lane))
            if lane is Lane.TIMED:
                args = (now_us, now_us, str(lane))
            statements.append((
                f"INSERT INTO `{table}` ({ready[0]}destination, message, created) "
                f"SELECT {ready[1]}destination, message, %s FROM `{dead}` "
                f"WHERE lane = %s{where} ORDER BY id",
                args,
            ))  # fmt: skip
        statements.append((f"DELETE FROM `{dead}` WHERE 1=1{where}", None))
        counts = await self.db.transaction(statements)
        return sum(counts[:-1])

    async def purge(self, lane: Lane | None = None, destination: str | None = None) -> int:
        return await purge_lanes(self.db, self.tables, lane, destination)

    async def purge_dead(self) -> int:
        return await self.db.execute(f"DELETE FROM `{self.tables.dead}`")
