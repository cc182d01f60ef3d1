"""Rows of the q4m dialect: their ids and keys, their statements, and rewriting them.

Q4M has no AUTO_INCREMENT, no index and no UPDATE. This process makes the row
ids (`Ids`); every row carries its destination's key (`dkey`), an integer a
conditional `queue_wait('table:dkey=K and ready<=NOW', 0)` can test, so a claim
takes a destination's own oldest rows (`Q4MSql.head_targets`). A row is changed
by taking it in owner mode on a dedicated connection (`own`), INSERTing its new
version (the same id, created and deliveries, unless they change) and
`queue_end()`ing the old one (`replace_owned`); two concurrent rewrites never
both copy a row (a connection lost between the INSERT and `queue_end()` leaves
both: at least once). `requeue_dead` and `rekey` (rows written before `dkey`
existed) work that way.
"""

from __future__ import annotations

import functools
import hashlib
import random
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import SchemaError
from ..interfaces import Lane
from ..urls import Tables

__all__ = ["Ids", "Q4MSql", "Statement", "dkey", "rekey", "requeue_dead"]

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


def dkey(destination: str) -> int:
    """The destination's key: what a conditional `queue_wait` can test (Q4M's
    conditions see integer columns only). 62 bits of BLAKE2b, never 0 (the default
    of rows written before the column existed).

    Compatibility surface: stored in every q4m row's `dkey` column by writers and
    tested by every reader's claims; changing the hash needs a version bump and a
    migration of the rows' keys."""
    digest = hashlib.blake2b(destination.encode("utf-8", "surrogatepass"), digest_size=8)
    return (int.from_bytes(digest.digest(), "big") >> 2) or 1


class Q4MSql:
    """The statements for one queue's tables."""

    def __init__(self, tables: Tables) -> None:
        self.tables = tables
        self._lane_of = {table: lane for lane, table in tables.all()}

    def select(self, table: str) -> str:
        """The row a connection owns in `table` (after `queue_wait` it sees no other):
        id, destination, message, deliveries, created, ready."""
        return f"SELECT id, destination, message, deliveries, created, ready FROM `{table}`"

    def wait_call(self, targets: Sequence[tuple[Lane, str, str]]) -> tuple[str, list[str]]:
        """`SELECT queue_wait(...)` over `targets` (lane, table, condition), in
        priority order; the timeout (always the last argument) is 0."""
        args = [f"{table}:{cond}" for _, table, cond in targets]
        return "SELECT queue_wait(" + ", ".join(["%s"] * len(args)) + ", 0)", args

    def emergency_targets(self, now_us: int) -> list[tuple[Lane, str, str]]:
        """The emergency lane's tables (shuffled: served fairly), rows due."""
        tables = list(self.tables.emergency)
        random.shuffle(tables)
        return [(Lane.EMERGENCY, t, f"ready<={now_us}") for t in tables]

    def head_targets(self, destination: str, now_us: int) -> list[tuple[Lane, str, str]]:
        """A destination's due timed rows, then its normal ones."""
        key = dkey(destination)
        return [
            (lane, t, f"dkey={key} and ready<={now_us}")
            for lane in (Lane.TIMED, Lane.NORMAL)
            for t in self.tables.lane(lane)
        ]

    def insert_sql(self, table: str) -> str:
        return (
            f"INSERT INTO `{table}` (id, destination, dkey, ready, message, created, "
            "deliveries) VALUES (%s, %s, %s, %s, %s, %s, %s)"
        )

    def insert(
        self, table: str, rid: int, dest: str, ready: int, blob: bytes, created: int,
        deliveries: int,
    ) -> Statement:  # fmt: skip
        return self.insert_sql(table), (rid, dest, dkey(dest), ready, blob, created, deliveries)

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


async def rekey(cur: Any, sql: Q4MSql, table: str, limit: int) -> int:
    """Rows written before the `dkey` column existed (dkey 0) cannot be claimed per
    destination: up to `limit` of `table`'s are taken in owner mode and written
    again with their key (same id, ready, created, deliveries): a one-time move of
    an upgrade, at the end of the table."""
    moved = 0
    for _ in range(limit):
        if not await own(cur, f"{table}:dkey=0"):
            break
        keyed = functools.partial(_keyed, sql, table)
        moved += await replace_owned(cur, sql.select(table), keyed)
    return moved


def _keyed(sql: Q4MSql, table: str, row: tuple[Any, ...]) -> Statement:
    return sql.insert(table, int(row[0]), row[1], int(row[5]), bytes(row[2]), int(row[4]),
                      int(row[3]))  # fmt: skip


async def requeue_dead(
    cur: Any,
    sql: Q4MSql,
    ids: Sequence[int] | None,
    new_id: Callable[[], int],
    where: str,
    now: int,
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
    requeued = functools.partial(_requeued, sql, new_id, now)
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


def _requeued(sql: Q4MSql, new_id: Callable[[], int], now: int, row: tuple[Any, ...]) -> Statement:
    """A dead letter (lane, destination, message) as a new row of its lane (a lane
    name this version does not know: normal), due `now` (µs)."""
    name = str(row[0])
    lane = Lane(name) if name in {x.value for x in Lane} else Lane.NORMAL
    table = random.choice(sql.tables.lane(lane))
    return sql.insert(table, new_id(), row[1], now, bytes(row[2]), now, 0)
