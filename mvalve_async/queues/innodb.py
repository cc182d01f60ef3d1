"""The innodb dialect: plain InnoDB tables, leases claimed with SKIP LOCKED.

A claim is one short READ COMMITTED transaction: one `SELECT ... FOR UPDATE SKIP
LOCKED` over the emergency lane and, per wanted destination, its first rows by
its index (`KEY destination`, (destination, id) in InnoDB; timed rows by
`KEY destination_ready`), then one `UPDATE` per table setting the lease. Nothing
is held while user code runs. Acks are one `DELETE ... WHERE lease_token = ? AND
id IN (...)` per table, sent with the next claim; dead letters are `INSERT ...
SELECT` + `DELETE` guarded by the lease token, so repeating them after a lost
connection is safe. Rows are never moved or rewritten to throttle them.

Scans find the destinations with rows without reading the rows: a loose index
scan (one index dive per destination) when full, the rows above the last id mark
when incremental (see `_scan_sql`). Times are on the server's clock
(`ServerClock`: `UNIX_TIMESTAMP(NOW(6))` samples).
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Iterable, Sequence
from typing import Any

from ..clock import ServerClock
from ..interfaces import Claimed, Found, Lane, Lease, QueueStats, QueueTraits, Row, Scan, Want
from ..schema import render
from ..tuning import INNODB_SCAN_CHUNK as _CHUNK
from ..tuning import INNODB_SCAN_SLACK as _SLACK
from ..urls import QueueSettings
from ._common import US, peek_item, row_args, schema_sql, tally, to_us
from ._mysql import (
    MySQLPool,
    Transaction,
    drop_tables,
    purge_lanes,
    read_dead_letters,
)
from ._sql import MYSQL, NEVER, Statements

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


def _keep(
    rows: list[tuple[list[int], Any, Any]],
    wants: Sequence[Want],
    emergency: int,
    rank: list[int],
) -> list[tuple[list[int], Any, Any]]:
    """The rows to lease, in the claim's order: the emergency lane's first (by
    created, id), then per want its due timed rows (by ready, created, id), then its
    normal rows (by created, id: several normal tables interleave by insertion), at
    most `n`. Row numbers: (k, w, id, deliveries, created, ready)."""
    groups: dict[int, list[tuple[list[int], Any, Any]]] = {}
    for row in rows:
        groups.setdefault(row[0][1], []).append(row)
    kept = sorted(groups.get(-1, []), key=lambda r: (r[0][4], r[0][2]))[:emergency]
    for w, want in enumerate(wants):
        mine = groups.get(w, [])
        mine.sort(key=lambda r: (rank[r[0][0]], r[0][5], r[0][4], r[0][2]))
        kept += mine[: want.n]
    return kept


class InnoDBQueue:
    name = "innodb"
    dialect = "innodb"
    traits = QueueTraits()

    def __init__(self, settings: QueueSettings) -> None:
        self.settings = settings
        self.tables = settings.tables
        self.db = MySQLPool(settings, multi_statements=True)
        self.clock = ServerClock(self._server_time, where=settings.safe_url())
        self.db.on_move = self.clock.invalidate  # a failover: another server's clock
        self._lane_of = {table: lane for lane, table in self.tables.all()}
        self._lanes = self.tables.all()
        self._rank = [list(Lane).index(lane) for lane, _ in self._lanes]  # per table
        self._sql = Statements(MYSQL, self.tables)
        self._next_due_sql = f"SELECT {self._sql.next_due}"
        self._scan_full = self._scan_sql(full=True)
        self._scan_more = self._scan_sql(full=False)

    async def _server_time(self) -> float:
        ((now,),) = await self.db.fetch("SELECT UNIX_TIMESTAMP(NOW(6))")
        return float(now)

    def __repr__(self) -> str:
        return f"InnoDBQueue({self.settings.safe_url()!r})"

    async def connect(self) -> None:
        await self.db.connect()
        if not self.clock.calibrated:
            await self.clock.calibrate()

    async def close(self) -> None:
        await self.clock.close()
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
        await self.db.insert(self._sql.insert[table], row_args(lane, rows, self.clock.now()))

    # -- scanning -------------------------------------------------------------

    def _scan_sql(self, full: bool) -> str:
        """One statement, its parts read in order: the id marks (and the emergency
        and next-due facts) first, so that a row written meanwhile is either in the
        parts that follow or above the mark. Full: a loose index scan of the
        destinations (one index dive per destination, however many rows each has).
        Incremental: rows above the marks (by primary key, at most `_CHUNK` ids),
        and timed rows come due since the last scan (by KEY ready)."""
        parts = [f"SELECT 'x', NULL, {self._sql.emergency_due}, {self._sql.next_due}"]
        for k, t in enumerate((*self.tables.normal, *self.tables.timed)):
            parts.append(f"SELECT 'm', {k}, IFNULL(MAX(id), 0), NULL FROM `{t}`")
        for k, t in enumerate(self.tables.normal):
            if full:
                parts.append(f"SELECT 'n', destination, -1, NULL FROM `{t}` GROUP BY destination")
            else:
                parts.append(
                    f"SELECT 'n', destination, COUNT(*), MAX(id) FROM `{t}` FORCE INDEX (PRIMARY) "
                    f"WHERE id > %(m{k})s AND id <= %(m{k})s + {_CHUNK} GROUP BY destination"
                )
        for j, t in enumerate(self.tables.timed):
            k = len(self.tables.normal) + j
            if full:
                parts.append(
                    f"SELECT 't', destination, MIN(ready), NULL FROM `{t}` GROUP BY destination"
                )
                continue
            parts.append(
                f"SELECT 't', destination, MIN(ready), MAX(id) FROM `{t}` FORCE INDEX (PRIMARY) "
                f"WHERE id > %(m{k})s AND id <= %(m{k})s + {_CHUNK} GROUP BY destination"
            )
            parts.append(
                f"SELECT 't', destination, MIN(ready), NULL FROM `{t}` FORCE INDEX (ready) "
                "WHERE ready > %(last)s AND ready <= %(now)s GROUP BY destination"
            )
        return " UNION ALL ".join(parts)

    async def scan(self, now: float, mark: Any = None) -> Scan:
        now_us = to_us(now)
        args: dict[str, int] = {"now": now_us}
        tables = (*self.tables.normal, *self.tables.timed)
        if mark is not None:
            marks, args["last"] = mark
            args.update({f"m{k}": max(0, m - _SLACK) for k, m in enumerate(marks)})
        rows = await self.db.fetch(self._scan_full if mark is None else self._scan_more, args)
        found: dict[str, Found] = {}
        emergency, due = False, None
        tops = [0] * len(tables)
        for kind, key, a, _b in rows:
            if kind == "x":
                emergency, due = bool(a), (int(_b) / US if _b < NEVER else None)
            elif kind == "m":
                tops[int(key)] = int(a)
            else:
                ready = int(a) / US if kind == "t" else 0.0
                count = int(a) if kind == "n" else -1
                f = found.get(key)
                if f is None:
                    found[key] = Found(count, 0.0 if ready <= now else ready)
                else:
                    f.ready = min(f.ready, 0.0 if ready <= now else ready)
                    f.rows = f.rows + count if f.rows > 0 and count > 0 else max(f.rows, count)
        if mark is None:
            new_marks = tops
        else:  # at most a chunk further: the rest is read by the next scans
            new_marks = [min(top, max(m, 0) + _CHUNK) for top, m in zip(tops, mark[0], strict=True)]
        return Scan(found, emergency, due, (new_marks, now_us), mark is None)

    # -- claiming -------------------------------------------------------------

    def _claim_sql(self, wants: Sequence[Want], emergency: int) -> str:
        """One statement over every part (a round trip, not one per part): each part
        locks a destination's (or the emergency lane's) first claimable rows with
        SKIP LOCKED, in its claim order, using its index; the client keeps the best
        `n` per want and the rest unlock at COMMIT. The numbers come packed in one
        text column (`k w id deliveries created ready`): every result column costs
        the client a column definition to parse."""
        parts = []
        for k, (lane, table) in enumerate(self._lanes):
            if lane is Lane.EMERGENCY and emergency > 0:
                parts.append(
                    f"(SELECT CONCAT_WS(' ', {k}, -1, id, deliveries, created, 0), destination, "
                    f"message FROM `{table}` WHERE lease_until <= %(now)s "
                    "ORDER BY id LIMIT %(e)s FOR UPDATE SKIP LOCKED)"
                )
        for w in range(len(wants)):
            for k, (lane, table) in enumerate(self._lanes):
                if lane is Lane.TIMED:
                    parts.append(
                        f"(SELECT CONCAT_WS(' ', {k}, {w}, id, deliveries, created, ready), "
                        f"destination, message FROM `{table}` WHERE destination = %(d{w})s "
                        "AND ready <= %(now)s AND lease_until <= %(now)s "
                        f"ORDER BY ready, created, id LIMIT %(n{w})s FOR UPDATE SKIP LOCKED)"
                    )
                elif lane is Lane.NORMAL:
                    parts.append(
                        f"(SELECT CONCAT_WS(' ', {k}, {w}, id, deliveries, created, 0), "
                        f"destination, message FROM `{table}` WHERE destination = %(d{w})s "
                        f"AND lease_until <= %(now)s ORDER BY id LIMIT %(n{w})s "
                        "FOR UPDATE SKIP LOCKED)"
                    )
        return " UNION ALL ".join(parts)

    async def claim(
        self,
        wants: Sequence[Want],
        now: float,
        lease_seconds: float,
        *,
        emergency: int = 0,
        acks: Sequence[Lease] = (),
        deadline: float | None = None,
    ) -> Claimed:
        """The acks and the claim in one transaction (`MySQLPool.transact`): START
        TRANSACTION + the acks' DELETEs + the SELECT ... SKIP LOCKED, then the lease
        UPDATEs and COMMIT: two round trips on one server; on Galera every statement
        alone, COMMIT too (a COMMIT riding with other statements can report OK for a
        transaction a node rolled back). Acked rows are gone before the SELECT
        (leased rows left at the head of a destination are rows its next claim must
        step over)."""
        deletes = _deletes(acks)
        select = self._claim_sql(wants, emergency)
        args: dict[str, Any] = {"now": to_us(now), "e": int(emergency)}
        for w, want in enumerate(wants):
            args[f"d{w}"], args[f"n{w}"] = want.destination, int(want.n)
        until = to_us(now + lease_seconds)
        lanes, rank = self._lanes, self._rank

        async def work(tx: Transaction) -> Claimed:
            token = secrets.randbits(62) + 1
            if not select:
                await tx.run(deletes)
                return Claimed()
            results = await tx.run([*deletes, (select, args)])
            found = results[-1].rows
            if not found:
                return Claimed()
            # (k, w, id, deliveries, created, ready), destination, message
            rows = [([int(x) for x in nums.split()], dest, blob) for nums, dest, blob in found]
            kept = _keep(rows, wants, emergency, rank)
            by_table: dict[str, list[int]] = {}
            for nums, _, _ in kept:
                by_table.setdefault(lanes[nums[0]][1], []).append(nums[2])
            await tx.run(
                [
                    f"UPDATE `{table}` SET lease_until = {int(until)}, "
                    f"lease_token = {int(token)}, deliveries = deliveries + 1 "
                    f"WHERE id IN ({_id_list(ids)})"
                    for table, ids in by_table.items()
                ],
                last=True,
            )
            return Claimed(
                Lease(lanes[nums[0]][0], lanes[nums[0]][1], nums[2], dest, bytes(blob),
                      nums[3] + 1, nums[5] / US if lanes[nums[0]][0] is Lane.TIMED else None,
                      token, created=nums[4])
                for nums, dest, blob in kept
            )  # fmt: skip

        return await self.db.transact(work, deadline=deadline)

    # -- settling -------------------------------------------------------------

    async def ack(self, leases: Sequence[Lease]) -> None:
        await self._settle(_deletes(leases))

    async def release(self, lease: Lease, delay: float = 0.0) -> None:
        until = to_us(self.clock.now() + delay) if delay > 0 else 0
        await self.db.execute(
            f"UPDATE `{lease.table}` SET lease_until = %s, lease_token = 0 "
            "WHERE id = %s AND lease_token = %s",
            (until, lease.id, lease.token),
        )

    async def give_back(self, leases: Sequence[Lease]) -> None:
        await self._settle([
            f"UPDATE `{t}` SET lease_until = 0, lease_token = 0, deliveries = "
            f"GREATEST(deliveries, 1) - 1 WHERE {_held(items)}"
            for t, items in _by_table(leases).items()
        ])  # fmt: skip

    async def _settle(self, statements: list[str]) -> None:
        """One table's: one autocommit statement, one round trip. Several tables': one
        transaction (COMMIT alone), however many claims they settle."""
        if len(statements) == 1:
            await self.db.execute(statements[0])
        elif statements:
            await self.db.transaction([(sql, None) for sql in statements])

    async def dead(self, leases: Sequence[Lease], reason: str) -> None:
        groups = _by_table(leases)
        if not groups:
            return
        died = to_us(self.clock.now())
        statements: list[tuple[str, Any]] = []
        for table, items in groups.items():
            held = _held(items)
            statements += [
                (f"{self._sql.dead_copy[table]} WHERE {held}",
                 (str(self._lane_of[table]), reason[:255], died)),
                (f"DELETE FROM `{table}` WHERE {held}", None),
            ]  # fmt: skip
        await self.db.transaction(statements)

    # -- looking --------------------------------------------------------------

    async def stats(self, now: float) -> QueueStats:
        args = {"now": to_us(now)}
        queued = {lane: 0 for lane in Lane}
        leased = {lane: 0 for lane in Lane}
        by_dest: dict[str, dict[str, int]] = {}
        dead = 0
        for kind, dest, n_leased, total in await self.db.fetch(self._sql.counts, args):
            n_leased, total = int(n_leased or 0), int(total)
            if kind == "dead":
                dead += total
                tally(by_dest, dest, "dead", total)
                continue
            lane = Lane(kind)
            leased[lane] += n_leased
            queued[lane] += total - n_leased
            tally(by_dest, dest, str(lane), total - n_leased)
            tally(by_dest, dest, "leased", n_leased)
        ((due,),) = await self.db.fetch(self._next_due_sql, args)
        next_due = int(due) / US if due < NEVER else None
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
                extra, order = ("ready", "ready, id") if timed else ("NULL", "id")
                rows.extend(
                    (table, *r)
                    for r in await self.db.fetch(
                        f"SELECT id, destination, {extra}, deliveries, lease_until, message "
                        f"FROM `{table}` ORDER BY {order} LIMIT %s",
                        (int(limit),),
                    )
                )
            rows.sort(key=lambda r: (r[3] or 0, r[1]))  # (ready, id)
            for table, rid, dest, ready, deliveries, until, blob in rows[: limit - len(out)]:
                out.append(
                    peek_item(row_lane, table, int(rid), dest,
                              ready / US if ready is not None else None, int(deliveries),
                              until / US, bytes(blob))
                )  # fmt: skip
        return out

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        return await read_dead_letters(self.db, self.tables.dead, limit, by_id=True)

    async def requeue_dead(self, ids: Sequence[int] | None = None) -> int:
        dead = self.tables.dead
        where = "" if ids is None else f" AND id IN ({_id_list(ids) or 0})"
        now_us = to_us(self.clock.now())

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
