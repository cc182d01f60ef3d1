"""In-memory QUEUE tables for the Q4M emulator, and the plain SQL on them
(CREATE/DROP/TRUNCATE/INSERT/SELECT/DELETE; UPDATE is refused).

Which rows a statement sees is the caller's business (owner mode lives in
the session): every function here takes a ``View``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from mysql_mimic import ResultColumn
from mysql_mimic.charset import CharacterSet
from mysql_mimic.errors import MysqlError
from mysql_mimic.results import AllowedResult
from mysql_mimic.types import ColumnType

from tests.q4m import sql
from tests.q4m.cond import compile_condition

STAT_NAMES = (
    "rows_written rows_removed wait_immediate wait_delayed wait_timeout "
    "restored_by_abort restored_by_close bytes_total bytes_removed"
).split()
Predicate = Callable[[Mapping[str, Any]], bool]


def mysql_error(msg: str, code: int) -> MysqlError:
    return MysqlError(msg, code)  # type: ignore[arg-type]  # any MySQL error number works


@dataclass(eq=False)
class Row:
    rowid: int  # hidden, per table, from 1: FIFO order
    values: dict[str, Any]  # lower-case column name -> value
    size: int
    owner: object | None = None  # the session owning it


class Table:
    def __init__(self, name: str, columns: list[sql.ColumnDef]) -> None:
        self.name, self.columns = name, columns
        self.by_name = {c.name.lower(): c for c in columns}
        self.int_columns = {c.name.lower() for c in columns if c.kind == "int"}
        self.rows: dict[int, Row] = {}  # insertion order == rowid order == FIFO
        self.next_rowid = 1
        self.stats = dict.fromkeys(STAT_NAMES, 0)
        self._conditions: dict[str, Predicate] = {}

    def column(self, name: str, where: str) -> sql.ColumnDef:
        try:
            return self.by_name[name.lower()]
        except KeyError:
            raise mysql_error(f"Unknown column '{name}' in '{where}'", 1054) from None

    def condition(self, expr: str) -> Predicate:
        """Compiled ``queue_wait('tbl:expr')`` condition (SqlError if bad)."""
        if expr not in self._conditions:
            self._conditions[expr] = compile_condition(expr, self.int_columns)
        return self._conditions[expr]

    def append(self, values: dict[str, Any], size: int) -> None:
        self.rows[self.next_rowid] = Row(self.next_rowid, values, size)
        self.next_rowid += 1
        self.stats["rows_written"] += 1
        self.stats["bytes_total"] += size

    def remove(self, row: Row) -> None:
        if self.rows.pop(row.rowid, None) is not None:
            self.stats["rows_removed"] += 1
            self.stats["bytes_removed"] += row.size


class Store:
    """All tables; every change happens under ``cond``'s lock."""

    def __init__(self) -> None:
        self.tables: dict[str, Table] = {}
        self.cond = asyncio.Condition()  # notified whenever a row becomes available
        self.parked = asyncio.Condition(self.cond._lock)  # type: ignore[attr-defined]  # same lock
        self.waiting = 0  # connections blocked in queue_wait; ``parked`` tells changes
        self.clock_offset = 0.0  # seconds the server's clock is ahead of this host's

    def table(self, name: str) -> Table:
        try:
            return self.tables[name]
        except KeyError:
            raise mysql_error(f"Table '{name}' doesn't exist", 1146) from None


class View(Protocol):
    """What a statement needs from the connection running it."""

    def visible(self, table: Table) -> list[Row]: ...

    def decode(self, raw: bytes) -> str: ...

    def text_charset(self) -> CharacterSet: ...


def execute(store: Store, stmt: sql.Statement, view: View) -> tuple[AllowedResult, int | None]:
    """Run a table statement; returns (result, affected rows or None)."""
    if isinstance(stmt, sql.CreateTable):
        if stmt.name in store.tables and not stmt.if_not_exists:
            raise mysql_error(f"Table '{stmt.name}' already exists", 1050)
        names = [c.name.lower() for c in stmt.columns]
        if len(set(names)) != len(names):
            raise mysql_error("Duplicate column name", 1060)
        store.tables.setdefault(stmt.name, Table(stmt.name, stmt.columns))
        return None, 0
    if isinstance(stmt, sql.DropTable):
        missing = [n for n in stmt.names if n not in store.tables]
        if missing and not stmt.if_exists:
            raise mysql_error(f"Unknown table '{','.join(missing)}'", 1051)
        for name in stmt.names:
            if (table := store.tables.pop(name, None)) is not None:
                table.rows.clear()  # its owners stay in owner mode with nothing to give back
        return None, 0
    if isinstance(stmt, sql.Truncate):
        table = store.table(stmt.name)
        table.rows.clear()
        for name in ("rows_written", "rows_removed", "bytes_total", "bytes_removed"):
            table.stats[name] = 0  # the engine recreates the file and its in-memory counters
        return None, 0
    if isinstance(stmt, sql.Update):
        store.table(stmt.table)
        raise mysql_error(f"Table storage engine for '{stmt.table}' doesn't have this option", 1031)
    if isinstance(stmt, sql.Insert):
        return None, _insert(store, stmt, view)
    if isinstance(stmt, sql.Delete):
        table = store.table(stmt.table)
        doomed = _matching(table, stmt.where, view)
        for row in doomed:
            table.remove(row)
        return None, len(doomed)
    assert isinstance(stmt, sql.Select) and stmt.table is not None
    return _select(store.table(stmt.table), stmt, view), None


def convert(col: sql.ColumnDef, value: Any, row_no: int, view: View) -> Any:
    """A literal from the parser -> the value stored in ``col``."""
    if value is sql.DEFAULT:
        value = col.default
        if value is sql.DEFAULT:
            if not col.nullable:
                raise mysql_error(f"Field '{col.name}' doesn't have a default value", 1364)
            value = None
    if value is sql.NOW:
        value = datetime.now().replace(microsecond=0)
    if value is None:
        if not col.nullable:
            raise mysql_error(f"Column '{col.name}' cannot be null", 1048)
        return None
    try:
        if isinstance(value, sql.Str):  # _binary'..' bytes are taken as they are
            if col.kind == "binary":
                return value.raw
            value = value.raw.decode() if value.binary else view.decode(value.raw)
        if col.kind == "int":
            return value if isinstance(value, int) else int(float(value))
        if col.kind == "float":
            return float(value)
        if col.kind == "binary":
            return str(value).encode()
        if col.kind == "datetime":
            return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
        return str(value)
    except (ValueError, UnicodeDecodeError):
        raise mysql_error(
            f"Incorrect {col.kind} value: '{value!s:.40}' for column '{col.name}' at row {row_no}",
            1366,
        ) from None


def _insert(store: Store, stmt: sql.Insert, view: View) -> int:
    table = store.table(stmt.table)
    targets = [table.column(n, "field list") for n in stmt.columns or table.by_name]
    new_rows = []
    for row_no, values in enumerate(stmt.rows, 1):
        if len(values) != len(targets):
            raise mysql_error(f"Column count doesn't match value count at row {row_no}", 1136)
        given = {c.name.lower(): v for c, v in zip(targets, values, strict=True)}
        row = {
            name: convert(col, given.get(name, sql.DEFAULT), row_no, view)
            for name, col in table.by_name.items()
        }
        new_rows.append(row)
    for row in new_rows:  # all or nothing
        table.append(row, sum(_size(v) for v in row.values()))
    store.cond.notify_all()
    return len(new_rows)


def _size(value: Any) -> int:
    if value is None:
        return 0
    return len(value) if isinstance(value, bytes) else len(str(value).encode())


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _matching(table: Table, where: list[sql.Cond], view: View) -> list[Row]:
    tests = []
    for cond in where:
        col = table.column(cond.column, "where clause")
        if cond.op in ("isnull", "notnull"):
            want_null = cond.op == "isnull"
            tests.append(lambda v, n=want_null: (v is None) == n)
        else:
            lit, op = convert(col, cond.value, 1, view), _OPS[cond.op]
            tests.append(lambda v, lit=lit, op=op: v is not None and lit is not None and op(v, lit))
    names = [table.column(cond.column, "where clause").name.lower() for cond in where]
    return [
        row
        for row in view.visible(table)
        if all(test(row.values[name]) for test, name in zip(tests, names, strict=True))
    ]


def result_column(label: str, kind: str, view: View) -> ResultColumn:
    if kind == "binary":  # charset binary: aiomysql hands back bytes, untouched
        return ResultColumn(label, ColumnType.BLOB, CharacterSet.binary)
    if kind == "text":
        return ResultColumn(label, ColumnType.VAR_STRING, view.text_charset())
    types = {"int": ColumnType.LONGLONG, "float": ColumnType.DOUBLE}
    return ResultColumn(label, types.get(kind, ColumnType.DATETIME))


def _select(table: Table, stmt: sql.Select, view: View) -> AllowedResult:
    rows = _matching(table, stmt.where, view)
    columns: list[ResultColumn] = []
    picks: list[str | None] = []  # a column name, or None for COUNT(*)
    for item in stmt.items:
        if item.kind == "count":
            columns.append(result_column(item.text, "int", view))
            picks.append(None)
            continue
        chosen = table.columns if item.kind == "star" else [table.column(item.name, "field list")]
        for col in chosen:
            columns.append(
                result_column(col.name if item.kind == "star" else item.text, col.kind, view)
            )
            picks.append(col.name.lower())
    if stmt.group_by or None in picks:
        keys = [table.column(name, "group statement").name.lower() for name in stmt.group_by]
        groups: dict[tuple[Any, ...], list[Row]] = {}
        for row in rows:
            groups.setdefault(tuple(row.values[k] for k in keys), []).append(row)
        batches = list(groups.values()) or ([] if keys else [[]])
    else:
        batches = [[row] for row in rows]
    out = [
        [
            len(batch) if pick is None else (batch[0].values[pick] if batch else None)
            for pick in picks
        ]
        for batch in batches
    ]
    return out[: stmt.limit] if stmt.limit is not None else out, columns
