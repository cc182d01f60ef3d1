"""The statements the innodb and sqlite dialects share, in each one's spelling.

The two send the same SQL for a row's insert, a dead letter's copy, the
emergency and next-due facts a scan reads, and the counts of `stats`; they differ
in how they write it: identifiers quoted (MySQL's backticks) or bare (SQLite: the
names are validated identifiers), placeholders (aiomysql's `%s` and `%(name)s`,
sqlite3's `?` and `:name`), and the n-ary minimum (`LEAST`, SQLite's scalar
`MIN`). A `Spelling` says which; `Statements` renders them once per queue, so no
call builds one. What differs in substance stays in each dialect: claims (SKIP
LOCKED in one statement, or BEGIN IMMEDIATE), how scans find destinations (a
loose index scan, or a recursive skip scan), give-backs, releases and requeues.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..interfaces import Lane
from ..urls import Tables

__all__ = ["MYSQL", "NEVER", "SQLITE", "Spelling", "Statements"]

NEVER = 9_000_000_000_000_000_000  # µs: "no timed row in the future" (`next_due`)


@dataclass(frozen=True, slots=True)
class Spelling:
    """How a dialect writes what the shared statements need."""

    quote: str  # around an identifier
    param: str  # a positional placeholder
    named: str  # a named placeholder, `{}` standing for the name
    least: str  # the minimum of two or more values

    def ident(self, name: str) -> str:
        return f"{self.quote}{name}{self.quote}"

    def name(self, key: str) -> str:
        return self.named.format(key)


MYSQL = Spelling("`", "%s", "%({})s", "LEAST")
SQLITE = Spelling("", "?", ":{}", "MIN")


class Statements:
    """The shared statements over one queue's tables (named parameter: `now`, in µs).

    - `insert[table]`: a row of that lane table; positional (destination, ready,
      message, created) in the timed lane, (destination, message, created) else.
    - `dead_copy[table]`: `INSERT INTO <dead> ... SELECT ... FROM <table>`, positional
      (lane, reason, died_at); the caller appends the WHERE naming the leased rows.
    - `emergency_due`: an expression, true when an emergency row is claimable.
    - `next_due`: an expression, the earliest future `ready` of the timed lane
      (`NEVER` when there is none).
    - `counts`: one statement, rows of (lane or "dead", destination, leased, rows).
    """

    def __init__(self, spelling: Spelling, tables: Tables) -> None:
        q, p, now = spelling.ident, spelling.param, spelling.name("now")
        self.insert: dict[str, str] = {}
        self.dead_copy: dict[str, str] = {}
        for lane, table in tables.all():
            if lane is Lane.TIMED:
                self.insert[table] = (
                    f"INSERT INTO {q(table)} (destination, ready, message, created) "
                    f"VALUES ({p}, {p}, {p}, {p})"
                )
            else:
                self.insert[table] = (
                    f"INSERT INTO {q(table)} (destination, message, created) VALUES ({p}, {p}, {p})"
                )
            self.dead_copy[table] = (
                f"INSERT INTO {q(tables.dead)} (lane, destination, message, reason, "
                f"deliveries, died_at) SELECT {p}, destination, message, {p}, deliveries, {p} "
                f"FROM {q(table)}"
            )
        self.emergency_due = " OR ".join(
            f"EXISTS(SELECT 1 FROM {q(t)} WHERE lease_until <= {now})" for t in tables.emergency
        )
        mins = ", ".join(
            f"IFNULL((SELECT MIN(ready) FROM {q(t)} WHERE ready > {now}), {NEVER})"
            for t in tables.timed
        )
        self.next_due = f"{spelling.least}({mins}, {NEVER})"
        parts = [
            f"SELECT '{lane}', destination, SUM(lease_until > {now} AND lease_token <> 0), "
            f"COUNT(*) FROM {q(t)} GROUP BY destination"
            for lane, t in tables.all()
        ]
        parts.append(
            f"SELECT 'dead', destination, 0, COUNT(*) FROM {q(tables.dead)} GROUP BY destination"
        )
        self.counts = " UNION ALL ".join(parts)
