"""The sqlite dialect: one embedded file shared by the processes of one host.

The file is opened in WAL mode, through one aiosqlite connection per queue that
keeps each operation's statements together (`_sqlite_conn`). A claim is one
`BEGIN IMMEDIATE` transaction over the lanes in priority order, leasing rows
with the innodb lease columns (`lease_until` in epoch microseconds, a random
`lease_token` per claim); nothing is held while user code runs. Ack, release,
move and dead act only on rows still held under the claim's token, so a late
settle of a lost lease does nothing.
"""

from __future__ import annotations

import random
import secrets
import sqlite3
import time
from collections.abc import Iterator, Sequence
from typing import Any

import aiosqlite

from ..errors import SchemaError
from ..interfaces import Lane, Lease, QueueStats, Row
from ..schema import render
from ..urls import QueueSettings
from ._common import (
    DEAD_COLUMNS,
    US,
    claim_groups,
    dead_letter,
    row_args,
    schema_sql,
    table_names,
    tally,
)
from ._sqlite_conn import SQLiteConnection

__all__ = ["HAS_RETURNING", "SQLiteQueue"]

HAS_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)  # UPDATE ... RETURNING
_CHUNK = 500  # ids per IN (...) list, far below SQLITE_MAX_VARIABLE_NUMBER (999 before 3.32)
_LANE_COLUMNS = {"id", "destination", "message", "created", "lease_until", "lease_token",
                 "deliveries"}  # fmt: skip
_SHAPES = {
    "lane": _LANE_COLUMNS,
    "timed": _LANE_COLUMNS | {"ready", "reserved"},
    "dead": {"id", "lane", "destination", "message", "reason", "deliveries", "died_at"},
}
_GUARD = "WHERE id = ? AND lease_token = ? AND lease_token <> 0"  # still held by this lease


def _us(t: float) -> int:
    """Rounded, where the MySQL dialects truncate (`_common.to_us`)."""
    return round(t * US)


def _chunks(ids: Sequence[int]) -> Iterator[tuple[str, list[int]]]:
    """(placeholders, ids) per slice of at most _CHUNK ids."""
    for i in range(0, len(ids), _CHUNK):
        part = [int(x) for x in ids[i : i + _CHUNK]]
        yield ",".join("?" * len(part)), part


class SQLiteQueue:
    name = "sqlite"
    dialect = "sqlite"

    def __init__(self, settings: QueueSettings, *, busy_timeout: float = 5.0) -> None:
        self.settings = settings
        self.tables = settings.tables
        self.use_returning = HAS_RETURNING
        self._lane_of = {table: lane for lane, table in self.tables.all()}
        self._conn = SQLiteConnection(settings, busy_timeout)
        self._poll_sql = self._build_poll()

    def __repr__(self) -> str:
        return f"SQLiteQueue({self.settings.safe_url()!r})"

    @property
    def busy_timeout(self) -> float:
        return self._conn.busy_timeout

    @busy_timeout.setter
    def busy_timeout(self, value: float) -> None:
        self._conn.busy_timeout = value

    # -- connection -------------------------------------------------------------

    async def connect(self) -> None:
        await self._conn.connect()

    async def close(self) -> None:
        await self._conn.close()

    # -- leases -------------------------------------------------------------------

    def _table(self, lease: Lease) -> str:
        if lease.table not in self._lane_of:  # never put a foreign name into SQL
            raise ValueError(f"lease of an unknown table {lease.table!r}")
        return lease.table

    def _groups(self, leases: Sequence[Lease]) -> dict[tuple[str, int], list[int]]:
        """Lease ids by (table, token), skipping token 0: never a claim's, it would
        match unleased rows."""
        held = claim_groups(lease for lease in leases if lease.token)
        return {
            (self._table(group[0]), token): [lease.id for lease in group]
            for (_, token), group in held.items()
        }

    # -- schema -----------------------------------------------------------------

    def schema_sql(self) -> str:
        return schema_sql(self.dialect, self.tables)

    async def create_schema(self) -> None:
        shapes = [(t, "timed" if lane is Lane.TIMED else "lane") for lane, t in self.tables.all()]
        async with self._conn.tx() as db:
            for table, shape in [*shapes, (self.tables.dead, "dead")]:  # tables already there
                rows = await db.execute_fetchall("SELECT name FROM pragma_table_info(?)", (table,))
                missing = _SHAPES[shape] - {r[0] for r in rows} if rows else set()
                if missing:
                    raise SchemaError(
                        f"{self.settings.safe_url()}: table {table} exists without column(s) "
                        f"{', '.join(sorted(missing))}: drop it or choose other table names"
                    )
            for statement in render(self.dialect, self.tables):
                await db.execute(statement)

    async def drop_schema(self) -> None:
        await self._conn.run([(f"DROP TABLE IF EXISTS {t}", ()) for t in table_names(self.tables)])

    # -- writing ----------------------------------------------------------------

    async def insert(self, lane: Lane, rows: Sequence[Row]) -> None:
        if not rows:
            return
        table = random.choice(self.tables.lane(lane))
        if lane is Lane.TIMED:
            sql = (f"INSERT INTO {table} (destination, ready, reserved, message, created) "
                   "VALUES (?, ?, ?, ?, ?)")  # fmt: skip
        else:
            sql = f"INSERT INTO {table} (destination, message, created) VALUES (?, ?, ?)"
        args = row_args(lane, rows, _us)
        if len(args) == 1:
            await self._conn.run([(sql, args[0])])
            return
        async with self._conn.tx() as db:
            await db.executemany(sql, args)

    # -- claiming ---------------------------------------------------------------

    async def claim(self, limit: int, now: float, lease_seconds: float) -> list[Lease]:
        if limit < 1:
            return []
        params = {"now": _us(now), "until": _us(now + lease_seconds),
                  "token": secrets.randbits(62) + 1}  # fmt: skip
        leases: list[Lease] = []
        async with self._conn.tx() as db:
            for lane in Lane:
                want = limit - len(leases)
                if want <= 0:
                    break
                leases += await self._claim_lane(db, lane, {**params, "n": want})
        return leases

    async def _claim_lane(
        self, db: aiosqlite.Connection, lane: Lane, p: dict[str, int]
    ) -> list[Lease]:
        timed = lane is Lane.TIMED
        cols = "id, destination, message, deliveries, " + (
            "ready, reserved, created" if timed else "NULL, 0, created"
        )
        where = ("ready <= :now AND " if timed else "") + "lease_until <= :now"
        order = "ready, created, id" if timed else "id"
        tables = self.tables.lane(lane)
        picked: list[tuple[str, Any]] = []
        if self.use_returning and len(tables) == 1:
            rows = await db.execute_fetchall(
                f"UPDATE {tables[0]} SET lease_until = :until, lease_token = :token, "
                f"deliveries = deliveries + 1 WHERE id IN (SELECT id FROM {tables[0]} "
                f"WHERE {where} ORDER BY {order} LIMIT :n) RETURNING {cols}",
                p,
            )
            # RETURNING gives rows in no particular order.
            picked = sorted(
                ((tables[0], r) for r in rows), key=lambda x: (x[1][4] or 0, x[1][6], x[1][0])
            )
            bump = 0  # RETURNING shows the incremented count
        else:
            for table in tables:
                rows = await db.execute_fetchall(
                    f"SELECT {cols} FROM {table} WHERE {where} ORDER BY {order} LIMIT :n", p
                )
                picked += [(table, r) for r in rows]
            if len(tables) > 1:  # ids are per table: merge by insertion time
                picked.sort(key=lambda x: (x[1][4] or 0, x[1][6], x[1][0]))
                picked = picked[: p["n"]]
            for table in tables:
                ids = [r[0] for t, r in picked if t == table]
                for marks, part in _chunks(ids):
                    await db.execute(
                        f"UPDATE {table} SET lease_until = ?, lease_token = ?, "
                        f"deliveries = deliveries + 1 WHERE id IN ({marks})",
                        [p["until"], p["token"], *part],
                    )
            bump = 1
        token = p["token"]
        return [Lease(lane, t, int(r[0]), r[1], bytes(r[2]), int(r[3]) + bump,
                      r[4] / US if timed else None, bool(r[5]), token, created=int(r[6]))
                for t, r in picked]  # fmt: skip

    # -- settling ---------------------------------------------------------------

    async def ack(self, leases: Sequence[Lease]) -> None:
        await self._conn.run([
            (f"DELETE FROM {table} WHERE lease_token = ? AND id IN ({marks})", [token, *part])
            for (table, token), ids in self._groups(leases).items()
            for marks, part in _chunks(ids)
        ])  # fmt: skip

    async def release(self, lease: Lease, delay: float = 0.0) -> None:
        until = _us(time.time() + delay) if delay > 0 else 0
        await self._conn.run([(
            f"UPDATE {self._table(lease)} SET lease_until = ?, lease_token = 0 {_GUARD}",
            (until, lease.id, lease.token),
        )])  # fmt: skip

    async def move(self, lease: Lease, ready: float, reserved: bool) -> None:
        table = self._table(lease)
        keep = "0" if reserved else "deliveries"
        if lease.lane is Lane.TIMED:  # stays in its table: keeps its id, hence its place
            await self._conn.run([(
                f"UPDATE {table} SET ready = ?, reserved = ?, deliveries = {keep}, "
                f"lease_until = 0, lease_token = 0 {_GUARD}",
                (_us(ready), int(reserved), lease.id, lease.token),
            )])  # fmt: skip
            return
        target = random.choice(self.tables.timed)
        async with self._conn.tx() as db:
            cur = await db.execute(
                f"INSERT INTO {target} (destination, ready, reserved, message, created, "
                f"deliveries) SELECT destination, ?, ?, message, created, {keep} "
                f"FROM {table} {_GUARD}",
                (_us(ready), int(reserved), lease.id, lease.token),
            )
            if cur.rowcount:
                await db.execute(f"DELETE FROM {table} {_GUARD}", (lease.id, lease.token))

    async def reschedule(self, destination: str, moves: Sequence[tuple[int, float, float]]) -> int:
        now = _us(time.time())
        return await self._conn.run([
            (f"UPDATE {table} SET ready = ? WHERE destination = ? AND reserved = 1 "
             "AND created = ? AND lease_until <= ?", (_us(new), destination, created, now))
            for created, _old, new in moves
            for table in self.tables.timed
        ])  # fmt: skip

    async def shift(self, destination: str, after: float, delta: float) -> int:
        return await self._conn.run([
            (f"UPDATE {table} SET ready = ready + ? "
             "WHERE destination = ? AND reserved = 1 AND ready > ?",
             (_us(delta), destination, _us(after)))
            for table in self.tables.timed
        ])  # fmt: skip

    async def dead(self, leases: Sequence[Lease], reason: str) -> None:
        groups = self._groups(leases)
        if not groups:
            return
        died = _us(time.time())
        async with self._conn.tx() as db:
            for (table, token), ids in groups.items():
                for marks, part in _chunks(ids):
                    guard = f"WHERE lease_token = ? AND id IN ({marks})"
                    await db.execute(
                        f"INSERT INTO {self.tables.dead} (lane, destination, message, reason, "
                        "deliveries, died_at) SELECT ?, destination, message, ?, deliveries, ? "
                        f"FROM {table} {guard} ORDER BY id",
                        [str(self._lane_of[table]), reason, died, token, *part],
                    )
                    await db.execute(f"DELETE FROM {table} {guard}", [token, *part])

    # -- looking ----------------------------------------------------------------

    def _build_poll(self) -> str:
        exists = [
            f"EXISTS(SELECT 1 FROM {t} WHERE "
            + ("ready <= :now AND " if lane is Lane.TIMED else "")
            + "lease_until <= :now)"
            for lane, t in self.tables.all()
        ]
        mins = " UNION ALL ".join(
            f"SELECT MIN(ready) AS m FROM {t} WHERE ready > :now" for t in self.tables.timed
        )
        return f"SELECT {' OR '.join(exists)}, (SELECT MIN(m) FROM ({mins}))"

    async def poll(self, now: float) -> tuple[bool, float | None]:
        ((ready, due),) = await self._conn.fetch(self._poll_sql, {"now": _us(now)})
        return bool(ready), (due / US if due is not None else None)

    async def stats(self, now: float) -> QueueStats:
        parts = [
            f"SELECT '{lane}', destination, lease_until > :now AND lease_token <> 0, "
            f"COUNT(*) FROM {t} GROUP BY 2, 3"
            for lane, t in self.tables.all()
        ]
        parts.append(f"SELECT 'dead', destination, 0, COUNT(*) FROM {self.tables.dead} GROUP BY 2")
        rows = await self._conn.fetch(" UNION ALL ".join(parts), {"now": _us(now)})
        queued = {lane: 0 for lane in Lane}
        leased = {lane: 0 for lane in Lane}
        dead = 0
        by_dest: dict[str, dict[str, int]] = {}
        for kind, dest, is_leased, count in rows:
            if kind == "dead":
                key, dead = "dead", dead + count
            else:
                key = "leased" if is_leased else kind
                (leased if is_leased else queued)[Lane(kind)] += count
            tally(by_dest, dest, key, count)
        _, next_due = await self.poll(now)
        return QueueStats(queued, leased, dead, by_dest, next_due)

    async def peek(self, limit: int = 20, lane: Lane | None = None) -> list[dict[str, Any]]:
        """One read-only statement (a consistent snapshot): no write lock, no lease change."""
        order = list(Lane)
        parts = [
            f"SELECT * FROM (SELECT '{row_lane}', '{t}', id, destination, "
            + ("ready, reserved" if row_lane is Lane.TIMED else "NULL, 0")
            + f", deliveries, lease_until, message FROM {t} ORDER BY "
            + ("ready, id" if row_lane is Lane.TIMED else "id")
            + " LIMIT :n)"
            for row_lane, t in self.tables.all()
            if lane is None or row_lane == lane
        ]
        rows = await self._conn.fetch(" UNION ALL ".join(parts), {"n": int(limit)})
        rows.sort(key=lambda r: (order.index(Lane(r[0])), r[4] or 0, r[2]))
        keys = ("lane", "table", "id", "destination", "ready", "reserved", "deliveries",
                "lease_until", "blob")  # fmt: skip
        out = [dict(zip(keys, r, strict=True)) for r in rows[: max(0, int(limit))]]
        for item in out:
            item["ready"] = item["ready"] / US if item["ready"] is not None else None
            item["reserved"] = bool(item["reserved"])
            item["lease_until"] /= US
            item["blob"] = bytes(item["blob"])
        return out

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self._conn.fetch(
            f"SELECT {DEAD_COLUMNS} FROM {self.tables.dead} ORDER BY id LIMIT ?", (int(limit),)
        )
        return [dead_letter(r) for r in rows]

    async def requeue_dead(self, ids: Sequence[int] | None = None) -> int:
        """INSERT ... SELECT per lane (a lane name this version does not know: normal)."""
        dead, now_us, total = self.tables.dead, _us(time.time()), 0
        chunks = [("", [])] if ids is None else [
            (f" AND id IN ({marks})", part) for marks, part in _chunks(sorted(set(ids)))
        ]  # fmt: skip
        async with self._conn.tx() as db:
            for where, part in chunks:
                for lane in Lane:
                    table, timed = random.choice(self.tables.lane(lane)), lane is Lane.TIMED
                    which = "lane NOT IN ('emergency', 'timed')"
                    if lane is not Lane.NORMAL:
                        which = f"lane = '{lane}'"
                    cur = await db.execute(
                        f"INSERT INTO {table} ({'ready, ' * timed}destination, message, created) "
                        f"SELECT {'?, ' * timed}destination, message, ? FROM {dead} "
                        f"WHERE {which}{where} ORDER BY id",
                        [*[now_us] * timed, now_us, *part],
                    )
                    total += cur.rowcount
                await db.execute(f"DELETE FROM {dead} WHERE 1{where}", part)
        return total

    async def purge(self, lane: Lane | None = None, destination: str | None = None) -> int:
        where, args = (
            ("", ()) if destination is None else (" WHERE destination = ?", (destination,))
        )
        return await self._conn.run([
            (f"DELETE FROM {t}{where}", args)
            for row_lane, t in self.tables.all()
            if lane is None or row_lane == lane
        ])  # fmt: skip

    async def purge_dead(self) -> int:
        return await self._conn.run([(f"DELETE FROM {self.tables.dead}", ())])
