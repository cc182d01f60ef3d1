"""In-process queue: the reference implementation of the `Queue` contract.

One process only; used by unit tests and the contract suite. Rows are kept per
table and destination in insertion order; the timed lane's are sorted by
(ready, created, id) when claimed. Its scans are always full (every destination
with rows, cheap here).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..clock import LocalClock
from ..interfaces import Claimed, Found, Lane, Lease, QueueStats, QueueTraits, Row, Scan, Want
from ..urls import QueueSettings

__all__ = ["MemoryQueue"]


@dataclass(slots=True)
class _Row:
    id: int
    lane: Lane
    table: str
    destination: str
    blob: bytes
    ready: float | None
    lease_until: float = 0.0
    token: int = 0
    deliveries: int = 0
    created: int = 0


class MemoryQueue:
    name = "memory"
    traits = QueueTraits(one_host=True)

    def __init__(self, settings: QueueSettings | None = None) -> None:
        self.settings = settings or QueueSettings("memory")
        self.tables = self.settings.tables
        self.clock = LocalClock()
        self._ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._lane_of = {table: lane for lane, table in self.tables.all()}
        # table -> destination -> id -> row (insertion order)
        self._rows: dict[str, dict[str, dict[int, _Row]]] = {t: {} for _, t in self.tables.all()}
        self._dead: dict[int, dict[str, Any]] = {}

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def schema_sql(self) -> str:
        return "-- the memory dialect has no schema\n"

    async def create_schema(self) -> None:
        return None

    async def drop_schema(self) -> None:
        self._rows = {t: {} for _, t in self.tables.all()}
        self._dead.clear()

    def _put(self, table: str, row: Row, deliveries: int = 0, created: int = 0) -> None:
        rid = next(self._ids)
        lane = self._lane_of[table]
        self._rows[table].setdefault(row.destination, {})[rid] = _Row(
            rid, lane, table, row.destination, row.blob,
            row.ready if lane is Lane.TIMED else None, deliveries=deliveries,
            created=created or int(self.clock.now() * 1_000_000) + rid,
        )  # fmt: skip

    def _all(self, table: str) -> list[_Row]:
        return [r for rows in self._rows[table].values() for r in rows.values()]

    async def insert(self, lane: Lane, rows: Sequence[Row]) -> None:
        table = random.choice(self.tables.lane(lane))
        for row in rows:
            if lane is Lane.TIMED and row.ready is None:
                raise ValueError("a timed row needs ready")
        for row in rows:
            self._put(table, row)

    # -- claiming -------------------------------------------------------------

    async def scan(self, now: float, mark: Any = None) -> Scan:
        found: dict[str, Found] = {}
        future: list[float] = []
        for lane, table in self.tables.all():
            if lane is Lane.EMERGENCY:
                continue
            for dest, rows in self._rows[table].items():
                for r in rows.values():
                    at = max(r.ready or 0.0, r.lease_until)
                    f = found.setdefault(dest, Found(0, at))
                    f.rows += 1
                    f.ready = min(f.ready, at)
                    if r.ready is not None and r.ready > now:
                        future.append(r.ready)
        emergency = any(r.lease_until <= now for t in self.tables.emergency for r in self._all(t))
        for f in found.values():
            if f.ready <= now:
                f.ready = 0.0
        return Scan(found, emergency, min(future, default=None), None, True)

    def _claimable(self, tables: Sequence[str], now: float, dest: str | None) -> list[_Row]:
        out: list[_Row] = []
        for table in tables:
            groups = self._rows[table].values() if dest is None else [
                self._rows[table].get(dest, {})
            ]  # fmt: skip
            for rows in groups:
                out += [
                    r for r in rows.values()
                    if r.lease_until <= now and (r.ready is None or r.ready <= now)
                ]  # fmt: skip
        return out

    def _lease(self, rows: list[_Row], now: float, lease_seconds: float, token: int) -> list[Lease]:
        out = []
        for r in rows:
            r.lease_until, r.token = now + lease_seconds, token
            r.deliveries += 1
            out.append(
                Lease(r.lane, r.table, r.id, r.destination, r.blob, r.deliveries, r.ready,
                      token, created=r.created)
            )  # fmt: skip
        return out

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
        await self.ack(acks)
        token = next(self._tokens)
        rows = self._claimable(self.tables.emergency, now, None)
        rows.sort(key=lambda r: (r.created, r.id))
        leases = Claimed(self._lease(rows[:emergency], now, lease_seconds, token))
        for want in wants:
            timed = self._claimable(self.tables.timed, now, want.destination)
            timed.sort(key=lambda r: (r.ready or 0.0, r.created, r.id))
            normal = self._claimable(self.tables.normal, now, want.destination)
            normal.sort(key=lambda r: (r.created, r.id))
            picked = (timed + normal)[: want.n]  # due timed rows first
            leases += self._lease(picked, now, lease_seconds, token)
        return leases

    def _held(self, lease: Lease) -> _Row | None:
        r = self._rows[lease.table].get(lease.destination, {}).get(lease.id)
        return r if r is not None and r.token == lease.token else None

    def _drop(self, r: _Row) -> None:
        rows = self._rows[r.table][r.destination]
        del rows[r.id]
        if not rows:
            del self._rows[r.table][r.destination]

    async def ack(self, leases: Sequence[Lease]) -> None:
        for lease in leases:
            r = self._held(lease)
            if r is not None:
                self._drop(r)

    async def release(self, lease: Lease, delay: float = 0.0) -> None:
        r = self._held(lease)
        if r is not None:
            r.lease_until = self.clock.now() + delay if delay > 0 else 0.0
            r.token = 0

    async def give_back(self, leases: Sequence[Lease]) -> None:
        for lease in leases:
            r = self._held(lease)
            if r is not None:
                r.lease_until, r.token = 0.0, 0
                r.deliveries = max(0, r.deliveries - 1)

    async def dead(self, leases: Sequence[Lease], reason: str) -> None:
        for lease in leases:
            r = self._held(lease)
            if r is None:
                continue
            self._drop(r)
            did = next(self._ids)
            self._dead[did] = {
                "id": did, "lane": str(r.lane), "destination": r.destination,
                "reason": reason, "deliveries": r.deliveries, "died_at": self.clock.now(),
                "blob": r.blob,
            }  # fmt: skip

    # -- looking ----------------------------------------------------------------

    async def stats(self, now: float) -> QueueStats:
        queued = {lane: 0 for lane in Lane}
        leased = {lane: 0 for lane in Lane}
        by_dest: dict[str, dict[str, int]] = {}
        future: list[float] = []
        for lane, table in self.tables.all():
            for r in self._all(table):
                held = r.lease_until > now and r.token != 0  # not a retry's delay
                key = "leased" if held else str(lane)
                (leased if held else queued)[lane] += 1
                d = by_dest.setdefault(r.destination, {})
                d[key] = d.get(key, 0) + 1
                if r.ready is not None and r.ready > now:
                    future.append(r.ready)
        for item in self._dead.values():
            d = by_dest.setdefault(item["destination"], {})
            d["dead"] = d.get("dead", 0) + 1
        return QueueStats(queued, leased, len(self._dead), by_dest, min(future, default=None))

    async def peek(self, limit: int = 20, lane: Lane | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for row_lane in Lane if lane is None else (lane,):
            if len(out) >= limit:
                break
            rows = [r for t in self.tables.lane(row_lane) for r in self._all(t)]
            rows.sort(key=lambda r: (r.ready or 0.0, r.id))
            for r in rows[: limit - len(out)]:
                out.append({
                    "id": r.id, "lane": str(r.lane), "table": r.table,
                    "destination": r.destination, "ready": r.ready,
                    "deliveries": r.deliveries, "lease_until": r.lease_until, "blob": r.blob,
                })  # fmt: skip
        return out

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        return [dict(v) for v in list(self._dead.values())[:limit]]

    async def requeue_dead(self, ids: Sequence[int] | None = None) -> int:
        chosen = list(self._dead) if ids is None else [i for i in ids if i in self._dead]
        for did in chosen:
            item = self._dead.pop(did)
            lane = Lane(item["lane"])
            row = Row(item["destination"], item["blob"], self.clock.now())
            self._put(random.choice(self.tables.lane(lane)), row)
        return len(chosen)

    async def purge(self, lane: Lane | None = None, destination: str | None = None) -> int:
        count = 0
        for row_lane, table in self.tables.all():
            if lane is not None and row_lane is not lane:
                continue
            for dest in [d for d in self._rows[table] if destination in (None, d)]:
                count += len(self._rows[table].pop(dest))
        return count

    async def purge_dead(self) -> int:
        n = len(self._dead)
        self._dead.clear()
        return n

    def __repr__(self) -> str:
        return "MemoryQueue()"
