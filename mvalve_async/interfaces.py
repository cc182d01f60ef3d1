"""The whole backend contract: a `Queue` (rows in lanes, leases) and a `Store`
(small per-key records updated atomically). Domain logic lives in reader/,
writer.py and throttle/; backends know nothing of rates or messages.

Times cross this boundary as float seconds since the epoch on the queue's shared
clock (`Queue.clock`, clock.py); SQL backends store them as integer microseconds.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from .clock import Clock

__all__ = [
    "Found",
    "Lane",
    "Lease",
    "Queue",
    "QueueStats",
    "QueueTraits",
    "Row",
    "Scan",
    "Store",
    "Want",
]

R = TypeVar("R")


class Lane(enum.StrEnum):
    """Readers serve emergency first, then timed rows that are due, then normal."""

    EMERGENCY = "emergency"
    TIMED = "timed"
    NORMAL = "normal"


@dataclass(slots=True)
class Row:
    """A row to insert. `ready` is used (and required) in the timed lane only."""

    destination: str
    blob: bytes
    ready: float | None = None


@dataclass(slots=True, eq=False)
class Lease:
    """A claimed row, invisible to other readers until acked, released or expired."""

    lane: Lane
    table: str
    id: int
    destination: str
    blob: bytes
    deliveries: int  # hand-outs including this one, if it is handed out
    ready: float | None = None  # timed lane
    token: int = 0  # innodb/sqlite: the claim's lease token
    handle: Any = field(default=None, repr=False)  # backend-private (q4m: its connection)
    shard: int = 0  # sharded queue: index of the child queue holding the row (else 0)
    created: int = 0  # insertion order (µs, unique per writer batch); 0: unknown


@dataclass(frozen=True, slots=True)
class Want:
    """Up to `n` of `destination`'s oldest claimable rows."""

    destination: str
    n: int


@dataclass(slots=True)
class Found:
    """A destination a scan found: about `rows` rows (-1: not counted), the first of
    them claimable at `ready` (0: now; a timed row: its ready time)."""

    rows: int = -1
    ready: float = 0.0


@dataclass(slots=True)
class Scan:
    """What `Queue.scan` found: destinations with rows (every one when `full`, else
    those with rows written or come due since the previous scan's `mark`), whether
    emergency rows are claimable, and the earliest future `ready` of the timed lane."""

    found: dict[str, Found]
    emergency: bool
    next_due: float | None
    mark: Any
    full: bool


@dataclass(slots=True)
class QueueStats:
    """Depth per lane and destination. `leased` counts rows claimed, not yet settled."""

    queued: dict[Lane, int]
    leased: dict[Lane, int]
    dead: int
    by_destination: dict[str, dict[str, int]]  # destination -> {"normal": n, "timed": n, ...}
    next_due: float | None = None


@dataclass(frozen=True, slots=True)
class QueueTraits:
    """What a dialect declares about itself, so that nothing probes for it.

    `leases_hold_connections`: every unsettled lease holds a server connection (q4m's
    owner mode): readers settle at once instead of batching acks.
    `process_leases`: a lease expires only in the process that holds it (q4m: a row
    comes back when its owner connection ends); else it expires for every reader.
    `ordered_heads`: `claim` gives each want exactly the destination's oldest
    claimable rows (q4m: the oldest not owned by another connection).
    `one_host`: every process using the queue is on one host (sqlite, memory), so
    the host's clock is shared by all of them."""

    leases_hold_connections: bool = False
    process_leases: bool = False
    ordered_heads: bool = True
    one_host: bool = False


@runtime_checkable
class Queue(Protocol):
    """Rows in three lanes (each one or more tables), claimed under leases, per
    destination.

    Every method is cancellation-safe in the sense of the delivery guarantees:
    a cancelled `claim` may leave rows leased, but the lease always expires
    (or, for q4m, ends with the connection), so nothing is stranded. Times are
    on `clock` (the queue's shared clock, clock.py).
    """

    name: str  # dialect name: "innodb", "q4m", "sqlite", "memory", "sharded"

    @property
    def traits(self) -> QueueTraits: ...

    @property
    def clock(self) -> Clock: ...

    async def connect(self) -> None:
        """Open pools/files (and calibrate the clock). Idempotent."""

    async def close(self) -> None:
        """Release every connection; rows still leased come back by expiry or abort."""

    async def create_schema(self) -> None: ...

    async def drop_schema(self) -> None: ...

    def schema_sql(self) -> str:
        """The DDL `create_schema` runs, for `mvalve create --print`."""

    async def insert(self, lane: Lane, rows: Sequence[Row]) -> None:
        """Insert rows into one table of `lane` (writers spread over tables)."""

    async def scan(self, now: float, mark: Any = None) -> Scan:
        """Which destinations have rows. `mark` None: all of them (`full`); else the
        `mark` of the previous scan: those with rows written since, or with timed
        rows come due since (a destination may be listed again). Cheap when nothing
        changed; never locks."""

    async def claim(
        self,
        wants: Sequence[Want],
        now: float,
        lease_seconds: float,
        *,
        emergency: int = 0,
        acks: Sequence[Lease] = (),
    ) -> list[Lease]:
        """Settle `acks` (as `ack`) and lease rows, in one transaction where the
        dialect can: up to `emergency` rows of the emergency lane (by insertion),
        then for each want up to `n` of its destination's oldest claimable rows,
        due timed rows first (by ready, then insertion), then normal rows (by
        insertion). Returns the emergency leases, then each want's in that order.
        Every claimed row's `deliveries` goes up by one."""

    async def ack(self, leases: Sequence[Lease]) -> None:
        """Delete the rows (only if still held under the same lease)."""

    async def release(self, lease: Lease, delay: float = 0.0) -> None:
        """A handed-out message goes back to its queue (a retry), visible again after
        `delay` seconds, keeping its place and its delivery count."""

    async def give_back(self, leases: Sequence[Lease]) -> None:
        """Rows claimed but never handed out go back at once, their place kept and
        their delivery count as before the claim."""

    async def dead(self, leases: Sequence[Lease], reason: str) -> None:
        """Atomically move rows to the dead-letter table with `reason`."""

    async def stats(self, now: float) -> QueueStats: ...

    async def peek(self, limit: int = 20, lane: Lane | None = None) -> list[dict[str, Any]]:
        """Read-only look at the rows of every lane (or `lane`), claiming and locking
        nothing: emergency, then timed by (ready, id), then normal by id; at most
        `limit` rows in all. Leased and not-yet-due rows are included. Keys: id,
        lane (str), table, destination, ready (timed lane, else None), deliveries,
        lease_until (0.0 when not leased; q4m: this process's leases only), blob."""

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """Rows of the dead-letter table: id, lane, destination, reason, deliveries,
        died_at, blob."""

    async def requeue_dead(self, ids: Sequence[int] | None = None) -> int:
        """Move dead letters back to their lane (all when `ids` is None)."""

    async def purge(self, lane: Lane | None = None, destination: str | None = None) -> int:
        """Delete queued rows (not dead letters); returns how many."""

    async def purge_dead(self) -> int: ...


@runtime_checkable
class Store(Protocol):
    """Small records shared by every reader; `update` is atomic per key."""

    name: str
    ops: int  # round trips to the server so far (for metrics and benchmarks)

    async def get(self, key: str) -> bytes | None: ...

    async def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """The records of `keys` that exist, in one round trip per server."""

    async def update(
        self,
        key: str,
        fn: Callable[[bytes | None], tuple[bytes | None, R]],
        ttl: float | Callable[[bytes], float] = 0,
    ) -> R:
        """Atomic read-modify-write. `fn(old)` returns (new value or None to leave the
        record unchanged, result). `fn` may run several times (optimistic retries)
        and must be pure. `ttl`: seconds the written record lives (0: for ever), or a
        function of the bytes written (called after `fn`). Raises `StoreError` when
        the server cannot be reached."""

    async def delete(self, key: str) -> None: ...

    async def close(self) -> None: ...
