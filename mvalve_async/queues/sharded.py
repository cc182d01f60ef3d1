"""A queue spread over several servers: N child queues of one dialect, no cluster.

`ShardedQueue([q0, q1, ...])` implements the whole `Queue` contract on top of
independent child queues (in practice one InnoDB queue per MySQL/MariaDB server,
built by `make_queue("mysql+innodb://user@h1:3306,h2:3306/db")`). Nothing is
shared between the servers: each row lives on exactly one of them.

Placement: a consistent-hash ring, not `crc32(destination) % N`
    Every destination lives on one shard, chosen by a ketama-style ring (MD5, 160
    points per shard, the shard named by its ``host:port``). All of a destination's
    rows are therefore on one server, so its order holds exactly as on one server.
    A ring rather than ``hash % N`` because of growth: adding an N+1-th shard moves
    about 1/(N+1) of the destinations to it, where ``% N`` would move nearly all of
    them. A destination that moves keeps its already queued rows on its old shard
    (they are still served from there) while its new rows go to the new one, so
    during that hand-over its order may invert; the rate still holds (the store is
    shared). Grow while the backlog is small, or let it drain. Since shards are named
    by host:port, listing the same servers in another order moves nothing.

Reading: per destination, and a dead shard does not stop the others
    The valve says which destinations may take how many rows (`Want`s); `claim`
    sends each want to its destination's shard, the emergency lane's share to every
    live shard, and the acks with their shard's claim, all at once. Emergency leases
    come first (merged by insertion time, the surplus given back), then each want's
    rows in its shard's order. `scan` asks every live shard and merges what each
    destination has queued and when its next timed row is due.
    Every lease is tagged with its shard (`Lease.shard`); ack, release, give_back
    and dead go back to that shard.

    A shard that raises `QueueUnavailable` (or does not answer `claim`/`scan`
    within `timeout` seconds) is marked down: one warning per outage, then claims
    and scans skip it and serve the others (its destinations wait), while a
    background probe (one `scan` after 1, 1, 2, 2, 3, 4, 5, 5 ... s) waits for it to
    answer again; then it is served again and one more line is logged. Only when
    *every* shard is down do `claim` and `scan` raise `QueueUnavailable` (the reader
    then backs off as usual).

    An ack for a shard that cannot be reached is kept and sent when the shard
    answers again (it is guarded by the lease token, like every ack): the reader
    is not held up by it. If the lease expired meanwhile and another reader took
    the row, it is delivered again: at least once, as always. Acks still unsent at
    `close()` are logged.

Writing: destination-pinned, no re-routing
    A writer whose destination lives on a down shard gets `QueueUnavailable` at
    once (while the shard is marked down, without waiting on the network). Rows
    are never sent to another shard instead: that would break the destination's
    order and, once the shard is back, let two shards serve it. `insert` groups its
    rows by shard and writes each group in one call; a batch spanning shards is
    atomic per shard only (if one shard fails after another succeeded, the
    successful part stays written), and is refused whole, before anything is
    written, when one of its shards is known to be down.

Everything else
    `stats` aggregates; `peek` merges by lane and insertion time (its ``table``
    reads ``name@host:port``, ids are each shard's own). Dead letters: ids are
    encoded as ``id * N + shard`` so they are unique across shards, and
    `requeue_dead` decodes them (so they are valid only as long as the shard list
    is the same; each dead letter also says its ``shard``). `stats`, `peek`, the
    dead-letter calls, `purge`, and the schema calls need every shard and raise
    `QueueUnavailable` naming the one missing: a partial answer would be mistaken
    for a whole one.

Beside this module: `_shards` (the ring, and which shards are up: marking down,
probing, the acks kept for a down shard). This one holds the `Queue` operations.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Sequence
from typing import Any

from ..clock import Clock
from ..errors import QueueError, QueueUnavailable
from ..interfaces import (
    Claimed,
    Found,
    Lane,
    Lease,
    Queue,
    QueueStats,
    QueueTraits,
    Row,
    Scan,
    Want,
)
from ..tuning import SHARD_BACKOFF
from ..urls import QueueSettings
from ._shards import HashRing, Shard, ShardSet

__all__ = ["HashRing", "ShardedQueue"]

_RANK = {lane: i for i, lane in enumerate(Lane)}


def _order(lease: Lease) -> tuple[int, float, int]:
    """Merge key across shards: lane, then ready (timed), then insertion time
    (`Lease.created`, wall-clock µs; 0 when unknown: ties keep the shard order)."""
    ready = (lease.ready or 0.0) if lease.lane is Lane.TIMED else 0.0
    return (_RANK[lease.lane], ready, lease.created)


class ShardedQueue:
    """The `Queue` contract over several child queues of one dialect (see the module
    docstring: placement, fairness, outages, dead-letter ids).

    `keys` name the shards on the ring (default: each child's ``host:port``, or
    ``shard<i>`` when those are not distinct). `timeout` bounds one shard's claim
    or scan: a shard slower than that counts as down. `backoff` are the seconds
    between probes of a down shard (the last one repeats). `settings` (optional) are
    the multi-host URL's settings, for `Pipe` (max_destination) and reprs.
    """

    name = "sharded"

    def __init__(
        self,
        queues: Sequence[Queue],
        *,
        keys: Sequence[str] | None = None,
        timeout: float = 10.0,
        backoff: Sequence[float] = SHARD_BACKOFF,
        settings: QueueSettings | None = None,
    ) -> None:
        if not queues:
            raise ValueError("a sharded queue needs at least one child queue")
        dialects = {q.name for q in queues}
        if len(dialects) != 1:
            raise ValueError(f"the shards must share one dialect, got {sorted(dialects)}")
        self.dialect = queues[0].name
        self._set = ShardSet(queues, keys, timeout, backoff)
        self.shards = self._set.shards
        self.ring = self._set.ring
        self.settings = settings if settings is not None else queues[0].settings
        self.tables = queues[0].settings.tables
        first = queues[0].traits
        # what every shard does; claims per destination go to one shard, so exact
        # heads hold if they hold on each
        self.traits = QueueTraits(
            leases_hold_connections=any(q.traits.leases_hold_connections for q in queues),
            process_leases=any(q.traits.process_leases for q in queues),
            ordered_heads=all(q.traits.ordered_heads for q in queues),
            one_host=first.one_host and len(queues) == 1,
        )
        self._clock: Clock | None = None

    def __repr__(self) -> str:
        return f"ShardedQueue([{', '.join(repr(s.queue) for s in self.shards)}])"

    @property
    def clock(self) -> Clock:
        """One designated shard's clock for every reader of the shards: the first
        listed shard that answered at connect (the first listed before that)."""
        return self._clock or self.shards[0].queue.clock

    @property
    def queues(self) -> list[Queue]:
        return [s.queue for s in self.shards]

    def shard_of(self, destination: str) -> int:
        """The index of the shard that holds `destination`'s rows."""
        return self.ring.lookup(destination)

    @property
    def timeout(self) -> float:
        """Seconds one shard's claim or scan may take before it counts as down."""
        return self._set.timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self._set.timeout = value

    @property
    def backoff(self) -> tuple[float, ...]:
        """Seconds between probes of a down shard (the last one repeats)."""
        return self._set.backoff

    @backoff.setter
    def backoff(self, value: tuple[float, ...]) -> None:
        self._set.backoff = value

    # -- lifecycle --------------------------------------------------------------

    async def connect(self) -> None:
        """Connect every shard; those that cannot be reached are marked down (and
        probed) so that the others serve. Raises only if none can be reached."""
        await self._set.connect()
        if self._clock is None:
            self._clock = next(s.queue.clock for s in self.shards if s.up)

    async def close(self) -> None:
        """Stop the probes, send the acks kept for down shards (or log them), and
        close every shard."""
        await self._set.close()

    def schema_sql(self) -> str:
        parts = []
        for s in self.shards:
            parts.append(f"-- shard {s.index + 1} of {len(self.shards)}: {s.label}\n")
            parts.append(s.queue.schema_sql())
        return "\n".join(parts)

    async def create_schema(self) -> None:
        await self._set.everywhere(lambda q: q.create_schema())

    async def drop_schema(self) -> None:
        await self._set.everywhere(lambda q: q.drop_schema())

    # -- writing --------------------------------------------------------------

    async def insert(self, lane: Lane, rows: Sequence[Row]) -> None:
        groups: dict[int, list[Row]] = {}
        for r in rows:
            groups.setdefault(self.ring.lookup(r.destination), []).append(r)
        targets = [self.shards[i] for i in groups]
        for shard in targets:  # refuse the whole batch before writing any of it
            if not shard.up:
                raise shard.unavailable()
        if len(groups) == 1:
            ((index, group),) = groups.items()
            await self._set.on(self.shards[index], lambda q: q.insert(lane, group))
            return

        async def write(index: int, rows: list[Row]) -> None:
            await self._set.on(self.shards[index], lambda q: q.insert(lane, rows))

        results = await asyncio.gather(
            *(write(i, g) for i, g in groups.items()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    # -- claiming -------------------------------------------------------------

    async def scan(self, now: float, mark: Any = None) -> Scan:
        """Every live shard's scan (each with its own mark; a shard that was down since
        its mark was taken, or is new to this mark, is scanned in full), merged. Full
        only when every shard's was. A shard that does not answer is marked down and
        left out."""
        marks: dict[int, tuple[int, Any]] = dict(mark or {})
        live = self._set.live()
        if not live:
            raise QueueUnavailable("every queue shard is down: " + self._set.down_list())

        async def one(shard: Shard) -> tuple[Shard, Scan] | None:
            seen = marks.get(shard.index)
            # a mark from before an outage is stale: rows may have come back meanwhile
            prev = seen[1] if seen is not None and seen[0] == shard.outages else None
            try:
                return shard, await self._set.bounded(shard, lambda q: q.scan(now, prev))
            except QueueUnavailable:
                return None

        results = [r for r in await asyncio.gather(*(one(s) for s in live)) if r is not None]
        if not results:
            raise QueueUnavailable("every queue shard is down: " + self._set.down_list())
        marks = {}  # a shard left out is scanned in full next time
        found: dict[str, Found] = {}
        for shard, part in results:
            marks[shard.index] = (shard.outages, part.mark)
            for dest, f in part.found.items():
                old = found.get(dest)
                if old is None:
                    found[dest] = Found(f.rows, f.ready)
                else:
                    old.ready = min(old.ready, f.ready)
                    old.rows = max(old.rows, 0) + max(f.rows, 0) or -1
        dues = [p.next_due for _, p in results if p.next_due is not None]
        full = len(results) == len(self.shards) and all(p.full for _, p in results)
        return Scan(found, any(p.emergency for _, p in results), min(dues, default=None),
                    marks, full)  # fmt: skip

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
        """Each want on its destination's shard, the emergency lane on every live
        shard, the acks with their shard's claim: concurrently. Emergency leases
        first (merged by insertion), then each want's. A shard that is down has its
        wants skipped (its destinations wait) and its acks kept for when it is back."""
        live = {s.index for s in self._set.live()}
        if not live:
            raise QueueUnavailable("every queue shard is down: " + self._set.down_list())
        per_wants: dict[int, list[Want]] = {}
        for want in wants:
            per_wants.setdefault(self.ring.lookup(want.destination), []).append(want)
        per_acks: dict[int, list[Lease]] = {}
        for lease in acks:
            per_acks.setdefault(lease.shard, []).append(lease)
        for index in [i for i in per_acks if i not in live]:
            self.shards[index].pending_acks.extend(per_acks.pop(index))
        asked = set(per_wants) | set(per_acks) | (live if emergency > 0 else set())
        got: dict[int, Claimed] = {}
        errors: list[BaseException] = []

        async def take(index: int) -> None:
            shard = self.shards[index]
            mine, settle = per_wants.get(index, []), per_acks.get(index, [])
            if index not in live:
                return
            try:
                leases = await self._set.bounded(
                    shard,
                    lambda q: q.claim(
                        mine,
                        now,
                        lease_seconds,
                        emergency=emergency,
                        acks=settle,
                        deadline=deadline,
                    ),
                )
            except QueueUnavailable:
                shard.pending_acks.extend(settle)  # sent by the probe when it is back
                return
            except QueueError as exc:
                errors.append(exc)
                return
            for lease in leases:
                lease.shard = index
            got[index] = leases

        await asyncio.gather(*(take(i) for i in sorted(asked)))
        if errors:
            leases = [x for batch in got.values() for x in batch]
            await asyncio.gather(*(self.give_back([x]) for x in leases), return_exceptions=True)
            raise errors[0]
        all_leases = [x for batch in got.values() for x in batch]
        out = sorted((x for x in all_leases if x.lane is Lane.EMERGENCY), key=_order)
        out = out[:emergency]
        by_dest: dict[str, list[Lease]] = {}
        for lease in all_leases:
            if lease.lane is not Lane.EMERGENCY:
                by_dest.setdefault(lease.destination, []).append(lease)
        for want in wants:
            out += by_dest.get(want.destination, [])
        extra = [x for x in all_leases if x.lane is Lane.EMERGENCY and x not in out]
        if extra:  # more emergency rows than asked, from several shards: back they go
            await self.give_back(extra)
        cut = [d for batch in got.values() for d in batch.cut]
        return Claimed(out, cut, any(batch.cut_emergency for batch in got.values()))

    async def ack(self, leases: Sequence[Lease]) -> None:
        groups: dict[int, list[Lease]] = {}
        for lease in leases:
            groups.setdefault(lease.shard, []).append(lease)

        async def one(shard: Shard, items: list[Lease]) -> None:
            if not shard.up:
                shard.pending_acks.extend(items)
                return
            try:
                await self._set.on(shard, lambda q: q.ack(items))
            except QueueUnavailable:
                shard.pending_acks.extend(items)  # sent by the probe when it is back

        await asyncio.gather(*(one(self.shards[i], items) for i, items in groups.items()))

    async def release(self, lease: Lease, delay: float = 0.0) -> None:
        await self._set.on(self.shards[lease.shard], lambda q: q.release(lease, delay))

    async def give_back(self, leases: Sequence[Lease]) -> None:
        groups: dict[int, list[Lease]] = {}
        for lease in leases:
            groups.setdefault(lease.shard, []).append(lease)
        for index, items in groups.items():  # each lambda is awaited in its own iteration
            await self._set.on(self.shards[index], lambda q: q.give_back(items))  # noqa: B023

    async def dead(self, leases: Sequence[Lease], reason: str) -> None:
        groups: dict[int, list[Lease]] = {}
        for lease in leases:
            groups.setdefault(lease.shard, []).append(lease)
        for index, items in groups.items():  # each lambda is awaited in its own iteration
            await self._set.on(self.shards[index], lambda q: q.dead(items, reason))  # noqa: B023

    # -- looking --------------------------------------------------------------

    async def stats(self, now: float) -> QueueStats:
        parts = await self._set.everywhere(lambda q: q.stats(now))
        queued = {lane: sum(p.queued.get(lane, 0) for p in parts) for lane in Lane}
        leased = {lane: sum(p.leased.get(lane, 0) for p in parts) for lane in Lane}
        by_dest: dict[str, dict[str, int]] = {}
        for p in parts:
            for dest, counts in p.by_destination.items():
                d = by_dest.setdefault(dest, {})
                for key, value in counts.items():
                    d[key] = d.get(key, 0) + value
        dues = [p.next_due for p in parts if p.next_due is not None]
        dead = sum(p.dead for p in parts)
        return QueueStats(queued, leased, dead, by_dest, min(dues) if dues else None)

    async def peek(self, limit: int = 20, lane: Lane | None = None) -> list[dict[str, Any]]:
        parts = await self._set.everywhere(lambda q: q.peek(limit, lane))

        def key(row: dict[str, Any]) -> tuple[int, float]:
            row_lane = Lane(row["lane"])
            return (_RANK[row_lane], (row["ready"] or 0.0) if row_lane is Lane.TIMED else 0.0)

        for shard, rows in zip(self.shards, parts, strict=True):
            for row in rows:
                row["table"] = f"{row['table']}@{shard.label}"
        return list(heapq.merge(*parts, key=key))[:limit]

    # Compatibility surface: dead-letter ids are `id * N + shard` (N shards, in the
    # URL's order), printed by `mvalve dead list` and taken back by `dead requeue` and
    # `requeue_dead`; changing the encoding needs a version bump.
    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        parts = await self._set.everywhere(lambda q: q.dead_letters(limit))
        n = len(self.shards)
        out: list[dict[str, Any]] = []
        for shard, rows in zip(self.shards, parts, strict=True):
            for row in rows:
                row["id"] = int(row["id"]) * n + shard.index
                row["shard"] = shard.label
                out.append(row)
        out.sort(key=lambda r: (r["died_at"], r["id"]))
        return out[:limit]

    async def requeue_dead(self, ids: Sequence[int] | None = None) -> int:
        if ids is None:
            return sum(await self._set.everywhere(lambda q: q.requeue_dead(None)))
        n = len(self.shards)
        groups: dict[int, list[int]] = {}
        for i in ids:
            groups.setdefault(int(i) % n, []).append(int(i) // n)
        total = 0
        for index, local in groups.items():  # each lambda is awaited in its own iteration
            total += await self._set.on(self.shards[index], lambda q: q.requeue_dead(local))  # noqa: B023
        return total

    async def purge(self, lane: Lane | None = None, destination: str | None = None) -> int:
        # Every shard, even with a destination: after a shard was added some of a
        # destination's rows may still be on its previous shard.
        return sum(await self._set.everywhere(lambda q: q.purge(lane, destination)))

    async def purge_dead(self) -> int:
        return sum(await self._set.everywhere(lambda q: q.purge_dead()))
