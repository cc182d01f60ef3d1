"""What the SQL dialects (innodb, q4m, sqlite) do alike, whatever their driver.

Times are stored as integer epoch microseconds; a writer's batch gets distinct,
ordered `created` values; settles group a claim's leases by (table, token); and
`stats`, `peek` and `dead_letters` answer in the same shapes everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ..interfaces import Lane, Lease, Row
from ..schema import render
from ..urls import Tables

US = 1_000_000
DEAD_COLUMNS = "id, lane, destination, reason, deliveries, died_at, message"
_DEAD_KEYS = ("id", "lane", "destination", "reason", "deliveries", "died_at", "blob")


def to_us(t: float) -> int:
    """Epoch seconds as the integer microseconds the tables store (rounded: a slot
    of the valve lives on the microsecond grid and must come back equal)."""
    return round(t * US)


def schema_sql(dialect: str, tables: Tables) -> str:
    return ";\n\n".join(render(dialect, tables)) + ";\n"


def table_names(tables: Tables) -> list[str]:
    """Every table of the queue: the lanes' in lane order, the dead letters' last."""
    return [t for _, t in tables.all()] + [tables.dead]


def row_args(lane: Lane, rows: Sequence[Row], now: float) -> list[tuple[Any, ...]]:
    """INSERT arguments: (destination, ready, message, created) per timed row,
    (destination, message, created) otherwise. `created` is now + i µs (the queue's
    clock), so a batch's rows keep distinct, ordered values."""
    base = to_us(now)
    if lane is not Lane.TIMED:
        return [(r.destination, r.blob, base + i) for i, r in enumerate(rows)]
    args: list[tuple[Any, ...]] = []
    for i, r in enumerate(rows):
        if r.ready is None:
            raise ValueError("a timed row needs ready")
        args.append((r.destination, to_us(r.ready), r.blob, base + i))
    return args


def claim_groups(leases: Iterable[Lease]) -> dict[tuple[str, int], list[Lease]]:
    """Leases by (table, token): one claim's rows in one table, settled together."""
    out: dict[tuple[str, int], list[Lease]] = {}
    for lease in leases:
        out.setdefault((lease.table, lease.token), []).append(lease)
    return out


def tally(by_dest: dict[str, dict[str, int]], dest: str, key: str, n: int) -> None:
    """Add `n` to `by_dest[dest][key]` (QueueStats.by_destination)."""
    d = by_dest.setdefault(dest, {})
    d[key] = d.get(key, 0) + n


def peek_item(
    lane: Lane, table: str, rid: int, dest: str, ready: float | None, deliveries: int,
    until: float, blob: bytes,
) -> dict[str, Any]:  # fmt: skip
    """One row as `peek` shows it (`ready` only in the timed lane)."""
    return {
        "id": rid, "lane": str(lane), "table": table, "destination": dest,
        "ready": ready if lane is Lane.TIMED else None, "deliveries": deliveries,
        "lease_until": until, "blob": blob,
    }  # fmt: skip


def dead_letter(row: Sequence[Any]) -> dict[str, Any]:
    """A dead-letter row read as DEAD_COLUMNS, as `dead_letters` shows it."""
    item = dict(zip(_DEAD_KEYS, row, strict=True))
    item["died_at"] /= US
    item["blob"] = bytes(item["blob"])
    return item
