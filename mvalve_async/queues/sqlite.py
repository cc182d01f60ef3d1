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
from collections.abc import Iterator, Sequence
from typing import Any

from ..clock import LocalClock
from ..errors import SchemaError
from ..interfaces import Claimed, Found, Lane, Lease, QueueStats, QueueTraits, Row, Scan, Want
from ..schema import render
from ..tuning import SQLITE_SCAN_SLACK as _SLACK
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
    to_us,
)
from ._sql import NEVER, SQLITE, Statements
from ._sqlite_conn import SQLiteConnection

__all__ = ["SQLiteQueue"]

_CHUNK = 500  # ids per IN (...) list, far below SQLITE_MAX_VARIABLE_NUMBER (999 before 3.32)
_LANE_COLUMNS = {"id", "destination", "message", "created", "lease_until", "lease_token",
                 "deliveries"}  # fmt: skip
_SHAPES = {
    "lane": _LANE_COLUMNS,
    "timed": _LANE_COLUMNS | {"ready"},
    "dead": {"id", "lane", "destination", "message", "reason", "deliveries", "died_at"},
}
_GUARD = "WHERE id = ? AND lease_token = ? AND lease_token <> 0"  # still held by this lease


_us = to_us


def _skip_scan(table: str) -> str:
    """Every distinct destination of `table`, one index seek each (SQLite has no
    loose index scan of its own: a DISTINCT would read every index entry)."""
    return (
        f"WITH RECURSIVE d(x) AS (SELECT (SELECT MIN(destination) FROM {table}) UNION ALL "
        f"SELECT (SELECT MIN(destination) FROM {table} WHERE destination > d.x) FROM d "
        "WHERE d.x IS NOT NULL) SELECT x FROM d WHERE x IS NOT NULL"
    )


def _merge(found: dict[str, Found], dest: str, rows: int, ready: float) -> None:
    f = found.get(dest)
    if f is None:
        found[dest] = Found(rows, ready)
        return
    f.ready = min(f.ready, ready)
    if rows > 0:
        f.rows = f.rows + rows if f.rows > 0 else rows


def _pick(
    rows: Sequence[Sequence[Any]], wants: Sequence[Want], emergency: int, lane_of: dict[str, Lane]
) -> list[Sequence[Any]]:
    """The rows to lease, in the claim's order: the emergency lane's first (by
    created, id), then per want its due timed rows (by ready, created, id) and its
    normal rows (by created, id), at most `n`. Rows: (want, table, id, destination,
    message, deliveries, ready, created); want -1 is the emergency lane."""
    groups: dict[int, list[Sequence[Any]]] = {}
    for row in rows:
        groups.setdefault(int(row[0]), []).append(row)

    def order(row: Sequence[Any]) -> tuple[int, int, int, int]:
        timed = lane_of[row[1]] is Lane.TIMED
        return (0 if timed else 1, row[6] if timed else 0, row[7], row[2])

    picked = sorted(groups.get(-1, []), key=lambda r: (r[7], r[2]))[:emergency]
    for w, want in enumerate(wants):
        picked += sorted(groups.get(w, []), key=order)[: want.n]
    return picked


def _chunks(ids: Sequence[int]) -> Iterator[tuple[str, list[int]]]:
    """(placeholders, ids) per slice of at most _CHUNK ids."""
    for i in range(0, len(ids), _CHUNK):
        part = [int(x) for x in ids[i : i + _CHUNK]]
        yield ",".join("?" * len(part)), part


class SQLiteQueue:
    name = "sqlite"
    dialect = "sqlite"
    traits = QueueTraits(one_host=True)

    def __init__(self, settings: QueueSettings, *, busy_timeout: float = 5.0) -> None:
        self.settings = settings
        self.tables = settings.tables
        self._lane_of = {table: lane for lane, table in self.tables.all()}
        self._conn = SQLiteConnection(settings, busy_timeout)
        self._sql = Statements(SQLITE, self.tables)
        self._poll_sql = f"SELECT {self._sql.emergency_due}, {self._sql.next_due}"
        self._next_due_sql = f"SELECT {self._sql.next_due}"
        self.clock = LocalClock()

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
        sql = self._sql.insert[random.choice(self.tables.lane(lane))]
        args = row_args(lane, rows, self.clock.now())
        if len(args) == 1:
            await self._conn.run([(sql, args[0])])
            return
        async with self._conn.tx() as db:
            await db.executemany(sql, args)

    # -- scanning ---------------------------------------------------------------

    async def scan(self, now: float, mark: Any = None) -> Scan:
        """Full: every destination of the normal tables (a skip scan of the
        destination index: one index seek per destination, whatever the backlog)
        and of the timed tables, with the id marks read first. Incremental: rows
        written since the marks (less `_SLACK`: an insert that committed behind a
        later one), and timed rows come due since the last scan."""
        now_us = _us(now)
        found: dict[str, Found] = {}
        normal, timed = self.tables.normal, self.tables.timed
        async with self._conn.session() as db:
            if mark is None:
                marks = {}
                for t in (*normal, *timed):
                    ((top,),) = await db.execute_fetchall(f"SELECT IFNULL(MAX(id), 0) FROM {t}")
                    marks[t] = int(top)
                for t in normal:
                    for (dest,) in await db.execute_fetchall(_skip_scan(t)):
                        found.setdefault(dest, Found())
                for t in timed:
                    for dest, ready in await db.execute_fetchall(
                        f"SELECT destination, MIN(ready) FROM {t} GROUP BY destination"
                    ):
                        _merge(found, dest, -1, ready / US)
            else:
                marks, last_us = dict(mark[0]), mark[1]
                for t in normal:
                    for dest, count, top in await db.execute_fetchall(
                        f"SELECT destination, COUNT(*), MAX(id) FROM {t} WHERE id > ? "
                        "GROUP BY destination", (marks[t] - _SLACK,),
                    ):  # fmt: skip
                        _merge(found, dest, int(count), 0.0)
                        marks[t] = max(marks[t], int(top))
                for t in timed:
                    for dest, ready, top in await db.execute_fetchall(
                        f"SELECT destination, MIN(ready), MAX(id) FROM {t} WHERE id > ? "
                        "GROUP BY destination", (marks[t] - _SLACK,),
                    ):  # fmt: skip
                        _merge(found, dest, -1, ready / US)
                        marks[t] = max(marks[t], int(top))
                    for dest, ready in await db.execute_fetchall(
                        f"SELECT destination, MIN(ready) FROM {t} WHERE ready > ? AND ready <= ? "
                        "GROUP BY destination", (last_us, now_us),
                    ):  # fmt: skip
                        _merge(found, dest, -1, ready / US)
            ((emergency, due),) = await db.execute_fetchall(self._poll_sql, {"now": now_us})
        for f in found.values():
            if f.ready <= now:
                f.ready = 0.0
        return Scan(found, bool(emergency), due / US if due < NEVER else None,
                    (marks, now_us), mark is None)  # fmt: skip

    # -- claiming ---------------------------------------------------------------

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
        """One BEGIN IMMEDIATE transaction: the acks' DELETEs, one SELECT of every
        candidate row (each part ordered and limited on its own), one UPDATE per
        table leasing the rows kept."""
        now_us = _us(now)
        parts: list[str] = []
        args: list[Any] = []
        cols = "id, destination, message, deliveries, {ready}, created"
        for t in self.tables.emergency:
            if emergency > 0:
                parts.append(
                    f"SELECT * FROM (SELECT -1, '{t}', {cols.format(ready='NULL')} FROM {t} "
                    "WHERE lease_until <= ? ORDER BY id LIMIT ?)"
                )
                args += [now_us, emergency]
        for w, want in enumerate(wants):
            for t in self.tables.timed:
                parts.append(
                    f"SELECT * FROM (SELECT {w}, '{t}', {cols.format(ready='ready')} FROM {t} "
                    "WHERE destination = ? AND ready <= ? AND lease_until <= ? "
                    "ORDER BY ready, created, id LIMIT ?)"
                )
                args += [want.destination, now_us, now_us, want.n]
            for t in self.tables.normal:
                parts.append(
                    f"SELECT * FROM (SELECT {w}, '{t}', {cols.format(ready='NULL')} FROM {t} "
                    "WHERE destination = ? AND lease_until <= ? ORDER BY id LIMIT ?)"
                )
                args += [want.destination, now_us, want.n]
        token = secrets.randbits(62) + 1
        until = _us(now + lease_seconds)
        async with self._conn.tx() as db:
            for (table, ack_token), ids in self._groups(acks).items():
                for marks, part in _chunks(ids):
                    await db.execute(
                        f"DELETE FROM {table} WHERE lease_token = ? AND id IN ({marks})",
                        [ack_token, *part],
                    )
            if not parts:
                return Claimed()
            rows = list(await db.execute_fetchall(" UNION ALL ".join(parts), args))
            picked = _pick(rows, wants, emergency, self._lane_of)
            for table in {r[1] for r in picked}:
                ids = [r[2] for r in picked if r[1] == table]
                for marks, part in _chunks(ids):
                    await db.execute(
                        f"UPDATE {table} SET lease_until = ?, lease_token = ?, "
                        f"deliveries = deliveries + 1 WHERE id IN ({marks})",
                        [until, token, *part],
                    )
        return Claimed(
            Lease(self._lane_of[t], t, int(rid), dest, bytes(blob), int(done) + 1,
                  ready / US if ready is not None else None, token, created=int(created))
            for _, t, rid, dest, blob, done, ready, created in picked
        )  # fmt: skip

    # -- settling ---------------------------------------------------------------

    async def ack(self, leases: Sequence[Lease]) -> None:
        await self._conn.run([
            (f"DELETE FROM {table} WHERE lease_token = ? AND id IN ({marks})", [token, *part])
            for (table, token), ids in self._groups(leases).items()
            for marks, part in _chunks(ids)
        ])  # fmt: skip

    async def release(self, lease: Lease, delay: float = 0.0) -> None:
        until = _us(self.clock.now() + delay) if delay > 0 else 0
        await self._conn.run([(
            f"UPDATE {self._table(lease)} SET lease_until = ?, lease_token = 0 {_GUARD}",
            (until, lease.id, lease.token),
        )])  # fmt: skip

    async def give_back(self, leases: Sequence[Lease]) -> None:
        await self._conn.run([
            (f"UPDATE {table} SET lease_until = 0, lease_token = 0, "
             f"deliveries = MAX(deliveries - 1, 0) WHERE lease_token = ? AND id IN ({marks})",
             [token, *part])
            for (table, token), ids in self._groups(leases).items()
            for marks, part in _chunks(ids)
        ])  # fmt: skip

    async def dead(self, leases: Sequence[Lease], reason: str) -> None:
        groups = self._groups(leases)
        if not groups:
            return
        died = _us(self.clock.now())
        async with self._conn.tx() as db:
            for (table, token), ids in groups.items():
                for marks, part in _chunks(ids):
                    guard = f"WHERE lease_token = ? AND id IN ({marks})"
                    await db.execute(
                        f"{self._sql.dead_copy[table]} {guard} ORDER BY id",
                        [str(self._lane_of[table]), reason, died, token, *part],
                    )
                    await db.execute(f"DELETE FROM {table} {guard}", [token, *part])

    # -- looking ----------------------------------------------------------------

    async def stats(self, now: float) -> QueueStats:
        args = {"now": _us(now)}
        rows = await self._conn.fetch(self._sql.counts, args)
        queued = {lane: 0 for lane in Lane}
        leased = {lane: 0 for lane in Lane}
        dead = 0
        by_dest: dict[str, dict[str, int]] = {}
        for kind, dest, n_leased, total in rows:
            if kind == "dead":
                dead += total
                tally(by_dest, dest, "dead", total)
                continue
            lane = Lane(kind)
            queued[lane] += total - n_leased
            leased[lane] += n_leased
            if total - n_leased:  # a key for what there is only (innodb: zeros too)
                tally(by_dest, dest, kind, total - n_leased)
            if n_leased:
                tally(by_dest, dest, "leased", n_leased)
        ((due,),) = await self._conn.fetch(self._next_due_sql, args)
        return QueueStats(queued, leased, dead, by_dest, due / US if due < NEVER else None)

    async def peek(self, limit: int = 20, lane: Lane | None = None) -> list[dict[str, Any]]:
        """One read-only statement (a consistent snapshot): no write lock, no lease change."""
        order = list(Lane)
        parts = [
            f"SELECT * FROM (SELECT '{row_lane}', '{t}', id, destination, "
            + ("ready" if row_lane is Lane.TIMED else "NULL")
            + f", deliveries, lease_until, message FROM {t} ORDER BY "
            + ("ready, id" if row_lane is Lane.TIMED else "id")
            + " LIMIT :n)"
            for row_lane, t in self.tables.all()
            if lane is None or row_lane == lane
        ]
        rows = await self._conn.fetch(" UNION ALL ".join(parts), {"n": int(limit)})
        rows.sort(key=lambda r: (order.index(Lane(r[0])), r[4] or 0, r[2]))
        keys = ("lane", "table", "id", "destination", "ready", "deliveries", "lease_until",
                "blob")  # fmt: skip
        out = [dict(zip(keys, r, strict=True)) for r in rows[: max(0, int(limit))]]
        for item in out:
            item["ready"] = item["ready"] / US if item["ready"] is not None else None
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
        dead, now_us, total = self.tables.dead, _us(self.clock.now()), 0
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
