"""In-process queue: the reference implementation of the `Queue` contract.

One process only; used by unit tests and the contract suite. Rows are kept in
insertion order per table; the timed lane is scanned by (ready, id).
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..interfaces import Lane, Lease, QueueStats, Row
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
    reserved: bool
    lease_until: float = 0.0
    token: int = 0
    deliveries: int = 0
    created: int = 0


class MemoryQueue:
    name = "memory"

    def __init__(self, settings: QueueSettings | None = None) -> None:
        self.settings = settings or QueueSettings("memory")
        self.tables = self.settings.tables
        self._ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._rows: dict[str, dict[int, _Row]] = {t: {} for _, t in self.tables.all()}
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

    def _put(self, lane: Lane, table: str, row: Row, deliveries: int = 0, created: int = 0) -> None:
        rid = next(self._ids)
        self._rows[table][rid] = _Row(
            rid, lane, table, row.destination, row.blob,
            row.ready if lane is Lane.TIMED else None, row.reserved, deliveries=deliveries,
            created=created or int(time.time() * 1_000_000) + rid,
        )  # fmt: skip

    async def insert(self, lane: Lane, rows: Sequence[Row]) -> None:
        table = random.choice(self.tables.lane(lane))
        for row in rows:
            if lane is Lane.TIMED and row.ready is None:
                raise ValueError("a timed row needs ready")
            self._put(lane, table, row)

    def _candidates(self, lane: Lane, now: float) -> list[_Row]:
        out: list[_Row] = []
        for table in self.tables.lane(lane):
            for r in self._rows[table].values():
                if r.lease_until <= now and (r.ready is None or r.ready <= now):
                    out.append(r)
        if lane is Lane.TIMED:
            out.sort(key=lambda r: (r.ready or 0.0, r.created, r.id))
        elif len(self.tables.lane(lane)) > 1:
            out.sort(key=lambda r: r.id)
        return out

    async def claim(self, limit: int, now: float, lease_seconds: float) -> list[Lease]:
        leases: list[Lease] = []
        token = next(self._tokens)
        for lane in Lane:
            for r in self._candidates(lane, now)[: limit - len(leases)]:
                r.lease_until = now + lease_seconds
                r.token = token
                r.deliveries += 1
                leases.append(
                    Lease(
                        lane,
                        r.table,
                        r.id,
                        r.destination,
                        r.blob,
                        r.deliveries,
                        r.ready,
                        r.reserved,
                        token,
                        created=r.created,
                    )
                )
            if len(leases) >= limit:
                break
        return leases

    def _held(self, lease: Lease) -> _Row | None:
        r = self._rows[lease.table].get(lease.id)
        return r if r is not None and r.token == lease.token else None

    async def ack(self, leases: Sequence[Lease]) -> None:
        for lease in leases:
            if self._held(lease) is not None:
                del self._rows[lease.table][lease.id]

    async def release(self, lease: Lease, delay: float = 0.0) -> None:
        r = self._held(lease)
        if r is not None:
            r.lease_until = time.time() + delay if delay > 0 else 0.0
            r.token = 0

    async def move(self, lease: Lease, ready: float, reserved: bool) -> None:
        r = self._held(lease)
        if r is None:
            return
        del self._rows[lease.table][lease.id]
        table = random.choice(self.tables.timed)
        keep = 0 if reserved else r.deliveries
        self._put(Lane.TIMED, table, Row(r.destination, r.blob, ready, reserved), keep, r.created)

    async def shift(self, destination: str, after: float, delta: float) -> int:
        count = 0
        for table in self.tables.timed:
            for r in self._rows[table].values():
                if r.destination == destination and r.reserved and (r.ready or 0.0) > after:
                    r.ready = (r.ready or 0.0) + delta
                    count += 1
        return count

    async def reschedule(self, destination: str, moves: Sequence[tuple[int, float, float]]) -> int:
        count = 0
        for created, _old, new in moves:
            for table in self.tables.timed:
                for r in self._rows[table].values():
                    found = r.destination == destination and r.reserved and r.created == created
                    if found and r.lease_until <= time.time():
                        r.ready = new
                        count += 1
        return count

    async def dead(self, leases: Sequence[Lease], reason: str) -> None:
        for lease in leases:
            r = self._held(lease)
            if r is None:
                continue
            del self._rows[lease.table][lease.id]
            did = next(self._ids)
            self._dead[did] = {
                "id": did, "lane": str(r.lane), "destination": r.destination,
                "reason": reason, "deliveries": r.deliveries, "died_at": time.time(),
                "blob": r.blob,
            }  # fmt: skip

    async def poll(self, now: float) -> tuple[bool, float | None]:
        ready = any(self._candidates(lane, now) for lane in Lane)
        future = [
            r.ready
            for t in self.tables.timed
            for r in self._rows[t].values()
            if r.ready is not None and r.ready > now
        ]
        return ready, min(future) if future else None

    async def stats(self, now: float) -> QueueStats:
        queued = {lane: 0 for lane in Lane}
        leased = {lane: 0 for lane in Lane}
        by_dest: dict[str, dict[str, int]] = {}
        for lane, table in self.tables.all():
            for r in self._rows[table].values():
                held = r.lease_until > now and r.token != 0  # not a retry's delay
                key = "leased" if held else str(lane)
                (leased if held else queued)[lane] += 1
                d = by_dest.setdefault(r.destination, {})
                d[key] = d.get(key, 0) + 1
        for item in self._dead.values():
            d = by_dest.setdefault(item["destination"], {})
            d["dead"] = d.get("dead", 0) + 1
        _, next_due = await self.poll(now)
        return QueueStats(queued, leased, len(self._dead), by_dest, next_due)

    async def peek(self, limit: int = 20, lane: Lane | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for row_lane in Lane if lane is None else (lane,):
            if len(out) >= limit:
                break
            rows = [r for t in self.tables.lane(row_lane) for r in self._rows[t].values()]
            rows.sort(key=lambda r: (r.ready or 0.0, r.id))
            for r in rows[: limit - len(out)]:
                out.append({
                    "id": r.id, "lane": str(r.lane), "table": r.table,
                    "destination": r.destination, "ready": r.ready, "reserved": r.reserved,
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
            row = Row(item["destination"], item["blob"], time.time(), False)
            self._put(lane, random.choice(self.tables.lane(lane)), row)
        return len(chosen)

    async def purge(self, lane: Lane | None = None, destination: str | None = None) -> int:
        count = 0
        for row_lane, table in self.tables.all():
            if lane is not None and row_lane is not lane:
                continue
            rows = self._rows[table]
            for rid in [i for i, r in rows.items() if destination in (None, r.destination)]:
                del rows[rid]
                count += 1
        return count

    async def purge_dead(self) -> int:
        n = len(self._dead)
        self._dead.clear()
        return n

    def __repr__(self) -> str:
        return "MemoryQueue()"
