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

Reading: fair, and a dead shard does not stop the others
    `claim(limit)` asks every live shard at once for its share of `limit` (the
    starting shard rotates on each call, so the remainder of an uneven split goes
    round), then tops up from shards that had more. The batch is merged lane by
    lane (emergency, due timed rows by ready, normal), each shard's own order kept.
    Lane priority is exact within a shard; across shards it holds within one
    claim's batch, but a claim filled from one shard can return normal rows while
    another shard holds an emergency row, which the next claim then gets.
    Every lease is tagged with its shard (`Lease.shard`); ack, release, move, dead
    go back to that shard, and `move` keeps the row on it.

    A shard that raises `QueueUnavailable` (or does not answer `claim`/`poll`
    within `timeout` seconds) is marked down: one warning per outage, then claims
    and polls skip it and serve the others, while a background probe (one `poll`
    after 1, 1, 2, 2, 3, 4, 5, 5 ... s) waits for it to answer again; then it is served
    again and one more line is logged. Only when *every* shard is down do `claim`
    and `poll` raise `QueueUnavailable` (the reader then backs off as usual).

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
    `shift` / `reschedule` go to the destination's shard. `poll` and `stats`
    aggregate; `peek` merges like `claim` (its ``table`` reads ``name@host:port``,
    ids are each shard's own). Dead letters: ids are encoded as ``id * N + shard``
    so they are unique across shards, and `requeue_dead` decodes them (so they are
    valid only as long as the shard list is the same; each dead letter also says
    its ``shard``). `stats`, `peek`, the dead-letter calls, `purge`, and the schema
    calls need every shard and raise `QueueUnavailable` naming the one missing:
    a partial answer would be mistaken for a whole one.

Beside this module: `_shards` (the ring, and which shards are up: marking down,
probing, the acks kept for a down shard). This one holds the `Queue` operations.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..errors import QueueError, QueueUnavailable
from ..interfaces import Lane, Lease, Queue, QueueStats, Row
from ._shards import BACKOFF, HashRing, Shard, ShardSet

__all__ = ["HashRing", "ShardedQueue"]

_RANK = {lane: i for i, lane in enumerate(Lane)}


def _order(lease: Lease) -> tuple[int, float, int]:
    """Merge key across shards: lane, then ready (timed), then insertion time
    (`Lease.created`, wall-clock µs; 0 when unknown: ties keep the shard order)."""
    ready = (lease.ready or 0.0) if lease.lane is Lane.TIMED else 0.0
    return (_RANK[lease.lane], ready, lease.created)


def _call(method: str, *args: Any) -> Callable[[Queue], Awaitable[Any]]:
    """`child.method(*args)` as a function of the child (binds args now, unlike a
    lambda in a loop)."""

    def run(q: Queue) -> Awaitable[Any]:
        result: Awaitable[Any] = getattr(q, method)(*args)
        return result

    return run


def _merge(per_shard: Sequence[list[Lease]]) -> list[Lease]:
    """One batch from per-shard batches: each shard's own order is kept (heapq.merge
    never reorders within one input), interleaved by `_order`."""
    return list(heapq.merge(*per_shard, key=_order))


class ShardedQueue:
    """The `Queue` contract over several child queues of one dialect (see the module
    docstring: placement, fairness, outages, dead-letter ids).

    `keys` name the shards on the ring (default: each child's ``host:port``, or
    ``shard<i>`` when those are not distinct). `timeout` bounds one shard's claim
    or poll: a shard slower than that counts as down. `backoff` are the seconds
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
        backoff: Sequence[float] = BACKOFF,
        settings: Any = None,
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
        self.settings = settings if settings is not None else getattr(queues[0], "settings", None)
        self.tables = getattr(queues[0], "tables", None)
        self.can_update = all(getattr(q, "can_update", True) for q in queues)
        self._turn = 0

    def __repr__(self) -> str:
        return f"ShardedQueue([{', '.join(repr(s.queue) for s in self.shards)}])"

    @property
    def queues(self) -> list[Queue]:
        return [s.queue for s in self.shards]

    def shard_of(self, destination: str) -> int:
        """The index of the shard that holds `destination`'s rows."""
        return self.ring.lookup(destination)

    @property
    def timeout(self) -> float:
        """Seconds one shard's claim or poll may take before it counts as down."""
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

        results = await asyncio.gather(
            *(self._set.on(self.shards[i], _call("insert", lane, g)) for i, g in groups.items()),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    # -- claiming -------------------------------------------------------------

    async def claim(self, limit: int, now: float, lease_seconds: float) -> list[Lease]:
        n = len(self.shards)
        start = self._turn % n
        self._turn += 1
        up = set(self._set.live())
        live = [s for s in (self.shards[(start + k) % n] for k in range(n)) if s in up]
        if not live:
            raise QueueUnavailable("every queue shard is down: " + self._set.down_list())
        got: dict[int, list[Lease]] = {}
        errors: list[BaseException] = []
        unavailable = 0

        async def take(shard: Shard, count: int) -> None:
            nonlocal unavailable
            try:
                leases = await self._set.bounded(
                    shard, lambda q: q.claim(count, now, lease_seconds)
                )
            except QueueUnavailable:
                unavailable += 1
                return
            except QueueError as exc:
                errors.append(exc)
                return
            for lease in leases:
                lease.shard = shard.index
            got.setdefault(shard.index, []).extend(leases)

        base, extra = divmod(limit, len(live))
        shares = [(s, base + (1 if k < extra else 0)) for k, s in enumerate(live)]
        await asyncio.gather(*(take(s, c) for s, c in shares if c > 0))
        total = sum(map(len, got.values()))
        if total < limit and not errors:  # top up from shards that may hold more
            for shard, share in shares:
                if total >= limit:
                    break
                if shard.up and (share == 0 or len(got.get(shard.index, ())) == share):
                    await take(shard, limit - total)
                    total = sum(map(len, got.values()))
        if errors:
            leases = [x for batch in got.values() for x in batch]
            await asyncio.gather(*(self.release(x) for x in leases), return_exceptions=True)
            raise errors[0]
        if unavailable == len(live) and not got:
            raise QueueUnavailable("every queue shard is down: " + self._set.down_list())
        return _merge([got[i] for i in sorted(got)])

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

    async def move(self, lease: Lease, ready: float, reserved: bool) -> None:
        await self._set.on(self.shards[lease.shard], lambda q: q.move(lease, ready, reserved))

    async def dead(self, leases: Sequence[Lease], reason: str) -> None:
        groups: dict[int, list[Lease]] = {}
        for lease in leases:
            groups.setdefault(lease.shard, []).append(lease)
        for index, items in groups.items():
            await self._set.on(self.shards[index], _call("dead", items, reason))

    async def shift(self, destination: str, after: float, delta: float) -> int:
        shard = self.shards[self.ring.lookup(destination)]
        return await self._set.on(shard, lambda q: q.shift(destination, after, delta))

    async def reschedule(self, destination: str, moves: Sequence[tuple[int, float, float]]) -> int:
        """Routed to the destination's shard (children without it: 0)."""
        shard = self.shards[self.ring.lookup(destination)]
        method = getattr(shard.queue, "reschedule", None)
        if method is None:
            return 0

        async def run(_q: Queue) -> int:
            return int(await method(destination, moves))

        return await self._set.on(shard, run)

    # -- looking --------------------------------------------------------------

    async def poll(self, now: float) -> tuple[bool, float | None]:
        live = self._set.live()
        if not live:
            raise QueueUnavailable("every queue shard is down: " + self._set.down_list())
        results = await asyncio.gather(
            *(self._set.bounded(s, lambda q: q.poll(now)) for s in live), return_exceptions=True
        )
        answers = [r for r in results if not isinstance(r, BaseException)]
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, QueueUnavailable):
                raise r
        if not answers:
            raise QueueUnavailable("every queue shard is down: " + self._set.down_list())
        ready = any(a[0] for a in answers)
        dues = [a[1] for a in answers if a[1] is not None]
        return ready, (min(dues) if dues else None)

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
        for index, local in groups.items():
            total += await self._set.on(self.shards[index], _call("requeue_dead", local))
        return total

    async def purge(self, lane: Lane | None = None, destination: str | None = None) -> int:
        # Every shard, even with a destination: after a shard was added some of a
        # destination's rows may still be on its previous shard.
        return sum(await self._set.everywhere(lambda q: q.purge(lane, destination)))

    async def purge_dead(self) -> int:
        return sum(await self._set.everywhere(lambda q: q.purge_dead()))
