"""The shards of a `ShardedQueue` (sharded.py) and their health.

`HashRing` places a destination on a shard (ketama-style consistent hashing).
`ShardSet` holds the shards and knows which are up: `on` runs a call on one shard
and marks it down when it raises `QueueUnavailable` (`bounded`: or does not answer
within `timeout`); a down shard fails at once, without waiting on the network,
while a background probe polls it (after `backoff` seconds, the last one
repeating) and, once it answers, sends the acks kept for it and marks it up.
`everywhere` needs every shard. The module docstring of sharded.py says why.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from ..errors import QueueError, QueueUnavailable
from ..interfaces import Lease, Queue
from ..tuning import SHARD_BACKOFF
from ..urls import hostport

__all__ = ["HashRing", "Shard", "ShardSet"]

log = logging.getLogger("mvalve_async.queues.sharded")  # the sharded queue's logger
T = TypeVar("T")


def _md5(text: str) -> bytes:
    return hashlib.md5(text.encode(), usedforsecurity=False).digest()


class HashRing:
    """Ketama-style consistent hashing: 40 MD5 digests x 4 points per key.

    Compatibility surface: every writer and reader process, of every version running
    at once, must put a destination on the same shard (its rows and its order live
    there); changing the hash, the points or the keys (``host:port``) moves
    destinations, and needs a version bump and a drained queue."""

    def __init__(self, keys: Sequence[str], replicas: int = 40) -> None:
        if not keys:
            raise ValueError("a ring needs at least one key")
        points: list[tuple[int, int]] = []
        for index, key in enumerate(keys):
            for i in range(replicas):
                digest = _md5(f"{key}-{i}")
                points.extend(
                    (int.from_bytes(digest[4 * k : 4 * k + 4], "little"), index) for k in range(4)
                )
        points.sort()
        self._hashes = [h for h, _ in points]
        self._owners = [i for _, i in points]
        self._cache: dict[str, int] = {}

    def lookup(self, name: str) -> int:
        """The index of the key that owns `name`."""
        found = self._cache.get(name)
        if found is None:
            h = int.from_bytes(_md5(name)[:4], "little")
            found = self._owners[bisect.bisect(self._hashes, h) % len(self._hashes)]
            if len(self._cache) >= 65536:
                self._cache.clear()
            self._cache[name] = found
        return found


@dataclass(eq=False)
class Shard:
    index: int
    key: str  # its name on the ring
    label: str  # for logs and errors (host:port, never a password)
    queue: Queue
    down_since: float | None = None  # monotonic; None: up
    outages: int = 0  # times marked down: a scan mark from before an outage is stale
    reason: str = ""
    probe: asyncio.Task[None] | None = None
    pending_acks: list[Lease] = field(default_factory=list)

    @property
    def up(self) -> bool:
        return self.down_since is None

    def unavailable(self) -> QueueUnavailable:
        return QueueUnavailable(f"queue shard {self.label} is unavailable ({self.reason})")


def _label(queue: Queue, index: int) -> str:
    settings = queue.settings
    if settings.dialect in ("sqlite", "memory"):
        return f"shard{index}"
    return hostport(settings.host, settings.port)


class ShardSet:
    """The shards, the ring over their keys, and which of them are up.

    `keys` name the shards on the ring (default: each child's ``host:port``, or
    ``shard<i>`` when those are not distinct)."""

    def __init__(
        self,
        queues: Sequence[Queue],
        keys: Sequence[str] | None,
        timeout: float,
        backoff: Sequence[float],
    ) -> None:
        labels = [_label(q, i) for i, q in enumerate(queues)]
        if keys is None:
            keys = (
                labels
                if len(set(labels)) == len(labels)
                else [f"shard{i}" for i in range(len(queues))]
            )
        if len(keys) != len(queues) or len(set(keys)) != len(keys):
            raise ValueError("one distinct key per shard is needed")
        if len(set(labels)) != len(labels):
            labels = [f"{label}#{i}" for i, label in enumerate(labels)]
        self.shards = [
            Shard(i, key, label, q)
            for i, (key, label, q) in enumerate(zip(keys, labels, queues, strict=True))
        ]
        self.ring = HashRing(list(keys))
        self.timeout = timeout
        self.backoff = tuple(backoff) or SHARD_BACKOFF

    # -- outages --------------------------------------------------------------

    def mark_down(self, shard: Shard, exc: BaseException) -> None:
        if shard.up:
            shard.outages += 1
            shard.down_since = time.monotonic()
            shard.reason = str(exc) or type(exc).__name__
            log.warning(
                "queue shard %s is unavailable (%s): serving the other shards, "
                "retrying it every few seconds",
                shard.label,
                shard.reason,
            )
        if shard.probe is None or shard.probe.done():
            with contextlib.suppress(RuntimeError):  # no running loop: probe lazily later
                shard.probe = asyncio.get_running_loop().create_task(self._probe(shard))

    async def _probe(self, shard: Shard) -> None:
        attempt = 0
        while True:
            await asyncio.sleep(self.backoff[min(attempt, len(self.backoff) - 1)])
            attempt += 1
            try:
                async with asyncio.timeout(self.timeout):
                    await shard.queue.connect()
                    await shard.queue.scan(shard.queue.clock.now(), None)
                    if shard.pending_acks:
                        acks = list(shard.pending_acks)
                        await shard.queue.ack(acks)
                        del shard.pending_acks[: len(acks)]
            except (QueueUnavailable, TimeoutError):
                continue
            except Exception as exc:  # answering, but wrongly: keep probing, say why
                shard.reason = str(exc) or type(exc).__name__
                continue
            down_for = time.monotonic() - (shard.down_since or time.monotonic())
            shard.down_since = None
            shard.probe = None
            log.warning("queue shard %s is back after %.1f s", shard.label, down_for)
            return

    async def on(self, shard: Shard, fn: Callable[[Queue], Awaitable[T]]) -> T:
        """Run `fn(child)`; fail at once while the shard is down, mark it down when it
        raises QueueUnavailable."""
        if not shard.up:
            raise shard.unavailable()
        try:
            return await fn(shard.queue)
        except QueueUnavailable as exc:
            self.mark_down(shard, exc)
            raise

    async def bounded(self, shard: Shard, fn: Callable[[Queue], Awaitable[T]]) -> T:
        """`on` within `timeout` (claims and scans: a hung server counts as down).
        Cancelling a claim is safe by contract: its leases expire."""
        try:
            async with asyncio.timeout(self.timeout):
                return await self.on(shard, fn)
        except TimeoutError:
            exc = QueueUnavailable(
                f"queue shard {shard.label} did not answer in {self.timeout:g} s"
            )
            self.mark_down(shard, exc)
            raise exc from None

    async def everywhere(self, fn: Callable[[Queue], Awaitable[T]]) -> list[T]:
        """`fn` on every shard concurrently; QueueUnavailable if any shard is down."""
        for shard in self.shards:
            if not shard.up:
                raise shard.unavailable()
        results = await asyncio.gather(
            *(self.on(s, fn) for s in self.shards), return_exceptions=True
        )
        out: list[T] = []
        for r in results:
            if isinstance(r, BaseException):
                raise r
            out.append(r)
        return out

    # -- lifecycle --------------------------------------------------------------

    async def connect(self) -> None:
        """Connect every shard; those that cannot be reached are marked down (and
        probed) so that the others serve. Raises only if none can be reached."""

        async def one(shard: Shard) -> None:
            try:
                await shard.queue.connect()
            except QueueUnavailable as exc:
                self.mark_down(shard, exc)

        await asyncio.gather(*(one(s) for s in self.shards))
        if not any(s.up for s in self.shards):
            error = QueueUnavailable("no queue shard can be reached: " + self.down_list())
            await self.close()  # stops the probes
            raise error

    def live(self) -> list[Shard]:
        """The shards that are up; a down one without a running probe gets one."""
        for s in self.shards:
            if not s.up and (s.probe is None or s.probe.done()):
                s.probe = asyncio.get_running_loop().create_task(self._probe(s))
        return [s for s in self.shards if s.up]

    def down_list(self) -> str:
        return ", ".join(f"{s.label} ({s.reason})" for s in self.shards if not s.up)

    async def close(self) -> None:
        probes = [s.probe for s in self.shards if s.probe is not None]
        for task in probes:
            task.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
        for shard in self.shards:
            shard.probe = None
            if shard.pending_acks:
                acks, shard.pending_acks = shard.pending_acks, []
                try:
                    async with asyncio.timeout(min(self.timeout, 2.0)):
                        await shard.queue.ack(acks)
                except (QueueError, TimeoutError):
                    log.warning(
                        "%d acks to queue shard %s could not be sent: those messages "
                        "will be delivered again when their leases expire",
                        len(acks),
                        shard.label,
                    )
        await asyncio.gather(*(s.queue.close() for s in self.shards), return_exceptions=True)
        for shard in self.shards:
            shard.down_since = None
