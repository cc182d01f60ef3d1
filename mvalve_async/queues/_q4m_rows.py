"""Rows of the q4m dialect: their ids, their statements, and rewriting them.

Q4M has no AUTO_INCREMENT and no UPDATE. This process makes the row ids
(`Ids`). A row is changed by taking it in owner mode by id on a dedicated
connection (`queue_wait('table:id=N', 0)`: `own`), INSERTing its new version
(the same id, created and deliveries, unless they change) and `queue_end()`ing
the old one (`replace_owned`); two concurrent rewrites never both copy a row (a
connection lost between the INSERT and `queue_end()` leaves both: at least
once). `retime` (shift, reschedule) and `requeue_dead` work that way. A claim
is one `queue_wait` over every lane table (`Q4MSql.wait_call`).
"""

from __future__ import annotations

import functools
import random
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import SchemaError
from ..interfaces import Lane
from ..urls import Tables
from ._common import to_us

__all__ = ["Ids", "Q4MSql", "Statement", "requeue_dead", "retime"]

Statement = tuple[str, tuple[Any, ...]]


class Ids:
    """Row ids: microseconds << 10 plus a per-process salt, strictly increasing in
    this process (Q4M has no AUTO_INCREMENT). Unique in practice across processes."""

    def __init__(self) -> None:
        self._last = 0
        self._salt = secrets.randbits(10)

    def __call__(self) -> int:
        self._last = max(self._last + 1, (time.time_ns() // 1000) << 10 | self._salt)
        return self._last


class Q4MSql:
    """The statements for one queue's tables."""

    def __init__(self, tables: Tables) -> None:
        self.tables = tables
        self._lane_of = {table: lane for lane, table in tables.all()}
        self._select = {table: self._select_sql(lane, table) for lane, table in tables.all()}

    @staticmethod
    def _select_sql(lane: Lane, table: str) -> str:
        extra = ", reserved" if lane is Lane.TIMED else ""
        return f"SELECT id, destination, message, deliveries, created, ready{extra} FROM `{table}`"

    def select(self, table: str) -> str:
        """The row a connection owns in `table` (after `queue_wait` it sees no other):
        id, destination, message, deliveries, created, ready[, reserved if timed]."""
        return self._select[table]

    def wait_call(self, now_us: int) -> tuple[str, list[str], list[tuple[Lane, str]]]:
        """`SELECT queue_wait(...)`: lanes in priority order, a lane's tables shuffled
        (served fairly), every table asked for rows with ready <= now; timeout 0."""
        args: list[str] = []
        targets: list[tuple[Lane, str]] = []
        for lane in Lane:
            tables = list(self.tables.lane(lane))
            random.shuffle(tables)
            for table in tables:
                args.append(f"{table}:ready<={now_us}")
                targets.append((lane, table))
        sql = "SELECT queue_wait(" + ", ".join(["%s"] * len(args)) + ", 0)"
        return sql, args, targets

    def insert_sql(self, table: str) -> str:
        if self._lane_of[table] is Lane.TIMED:
            return (
                f"INSERT INTO `{table}` (id, destination, ready, reserved, message, created, "
                "deliveries) VALUES (%s, %s, %s, %s, %s, %s, %s)"
            )
        return (
            f"INSERT INTO `{table}` (id, destination, ready, message, created, deliveries) "
            "VALUES (%s, %s, %s, %s, %s, %s)"
        )

    def insert_args(
        self, table: str, rid: int, dest: str, ready: int, reserved: bool, blob: bytes,
        created: int, deliveries: int,
    ) -> tuple[Any, ...]:  # fmt: skip
        if self._lane_of[table] is Lane.TIMED:
            return (rid, dest, ready, int(reserved), blob, created, deliveries)
        return (rid, dest, ready, blob, created, deliveries)

    def insert(
        self, table: str, rid: int, dest: str, ready: int, reserved: bool, blob: bytes,
        created: int, deliveries: int,
    ) -> Statement:  # fmt: skip
        args = self.insert_args(table, rid, dest, ready, reserved, blob, created, deliveries)
        return self.insert_sql(table), args

    def insert_dead(self) -> str:
        return (
            f"INSERT INTO `{self.tables.dead}` (id, lane, destination, message, reason, "
            "deliveries, died_at) VALUES (%s, %s, %s, %s, %s, %s, %s)"
        )


# -- rewriting rows by id, on a dedicated connection ---------------------------------


async def own(cur: Any, target: str) -> Any:
    """`queue_wait(target, 0)` (target: 'table' or 'table:condition'): 1 when the
    connection now owns a row, 0 when there is none to take, None when the table
    is missing or is not a Q4M table."""
    await cur.execute("SELECT queue_wait(%s, 0)", (target,))
    (index,) = await cur.fetchone()
    return index


async def replace_owned(cur: Any, select: str, make: Callable[[Any], Statement]) -> bool:
    """The row `cur` owns, read with `select`, INSERTed again as `make(row)`; then
    `queue_end()` removes the owned one. False when it owned nothing after all."""
    await cur.execute(select)
    row = await cur.fetchone()
    if row is not None:
        await cur.execute(*make(row))
    await cur.execute("SELECT queue_end()")
    await cur.fetchall()
    return row is not None


async def retime(
    cur: Any, sql: Q4MSql, finds: Sequence[tuple[str, tuple[Any, ...], Callable[[int], int]]]
) -> int:
    """The timed rows each `WHERE` finds are listed first (plain SELECTs), then each
    is taken by `queue_wait('timed:id=N and ready=R', 0)`, re-inserted with its new
    ready (`find`'s function of the old one; same id, created and deliveries; in
    new-ready order) and `queue_end()`ed. Rows owned elsewhere are skipped."""
    found: list[tuple[int, int, int, str]] = []
    for where, args, new_ready in finds:
        for table in sql.tables.timed:  # no queue_wait yet: every unowned row
            await cur.execute(f"SELECT id, ready FROM `{table}` WHERE {where}", args)
            found.extend(
                (new_ready(int(ready)), int(rid), int(ready), table)
                for rid, ready in await cur.fetchall()
            )
    moved = 0
    for new, rid, ready, table in sorted(set(found)):
        if not await own(cur, f"{table}:id={rid} and ready={ready}"):
            continue
        retimed = functools.partial(_retimed, sql, table, rid, new)
        moved += await replace_owned(cur, sql.select(table), retimed)
    return moved


def _retimed(sql: Q4MSql, table: str, rid: int, ready: int, row: tuple[Any, ...]) -> Statement:
    """An owned timed row (`Q4MSql.select`) again with a new ready, reserved; the
    same id, created and deliveries."""
    return sql.insert(table, rid, row[1], ready, True, bytes(row[2]), int(row[4]), int(row[3]))


async def requeue_dead(
    cur: Any, sql: Q4MSql, ids: Sequence[int] | None, new_id: Callable[[], int], where: str
) -> int:
    """Dead letters (`ids`, or all) back to their lanes, each taken by
    `queue_wait('dead:id=N', 0)`, inserted as a new row and `queue_end()`ed."""
    dead = sql.tables.dead
    if ids is None:
        await cur.execute(f"SELECT COUNT(*) FROM `{dead}`")
        (count,) = await cur.fetchone()
        targets = [dead] * int(count)
    else:
        targets = [f"{dead}:id={int(i)}" for i in ids]
    select = f"SELECT lane, destination, message FROM `{dead}`"
    requeued = functools.partial(_requeued, sql, new_id)
    moved = 0
    for target in targets:
        index = await own(cur, target)
        if index is None:
            raise SchemaError(f"{where}: table {dead} is missing")
        if not index:
            if ids is None:
                break
            continue
        moved += await replace_owned(cur, select, requeued)
    return moved


def _requeued(sql: Q4MSql, new_id: Callable[[], int], row: tuple[Any, ...]) -> Statement:
    """A dead letter (lane, destination, message) as a new row of its lane (a lane
    name this version does not know: normal)."""
    name = str(row[0])
    lane = Lane(name) if name in {x.value for x in Lane} else Lane.NORMAL
    table = random.choice(sql.tables.lane(lane))
    now = to_us(time.time())
    return sql.insert(table, new_id(), row[1], now, False, bytes(row[2]), now, 0)
