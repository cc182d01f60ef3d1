"""The whole backend contract: a `Queue` (rows in lanes, leases) and a `Store`
(small per-key records updated atomically). Domain logic lives in reader/,
writer.py and throttle/; backends know nothing of rates or messages.

Times cross this boundary as float seconds since the epoch on the queue's shared
clock (`Queue.clock`, clock.py); SQL backends store them as integer microseconds.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from .clock import Clock

if TYPE_CHECKING:  # urls.py imports Lane from here: for the annotation only
    from .urls import QueueSettings

__all__ = [
    "Claimed",
    "Found",
    "Lane",
    "Lease",
    "Queue",
    "QueueStats",
    "QueueTraits",
    "Row",
    "Scan",
    "Store",
    "StoreHealth",
    "Want",
]

R = TypeVar("R")


class Lane(enum.StrEnum):
    """Readers serve emergency first, then timed rows that are due, then normal.

    Compatibility surface: the values are stored (a dead letter's `lane` column says
    where `requeue` puts it back); renaming one needs a migration of those rows."""

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


class Claimed(list[Lease]):
    """What `Queue.claim` returns: the leases, in order, and `cut`, the destinations
    whose wants the claim did not try to the end for want of *capacity*, not of rows
    (q4m: no idle owner connection was left), with `cut_emergency` for the emergency
    lane. A want that came back short and is not cut has no claimable row left."""

    __slots__ = ("cut", "cut_emergency")

    def __init__(
        self,
        leases: Iterable[Lease] = (),
        cut: Iterable[str] = (),
        cut_emergency: bool = False,
    ) -> None:
        super().__init__(leases)
        self.cut = frozenset(cut)
        self.cut_emergency = cut_emergency


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
    # What the queue was made from (its URL's): tables, max_destination, the server
    # (a sharded queue: the multi-host URL's). Pipes, the stats log and the shards'
    # labels read it.
    settings: QueueSettings

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
        deadline: float | None = None,
    ) -> Claimed:
        """Settle `acks` (as `ack`) and lease rows, in one transaction where the
        dialect can: up to `emergency` rows of the emergency lane (by insertion),
        then for each want up to `n` of its destination's oldest claimable rows,
        due timed rows first (by ready, then insertion), then normal rows (by
        insertion). Returns the emergency leases, then each want's in that order;
        a want that gets fewer than `n` has no claimable row left, unless the claim
        names it `cut` (it ran out of capacity first).
        Every claimed row's `deliveries` goes up by one. A dialect that waits on a
        server returns or raises `QueueUnavailable` by `deadline` (loop time)."""

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


@dataclass(frozen=True, slots=True)
class StoreHealth:
    """What a store server says about itself, to detect that it may have forgotten
    records (`Store.health`).

    - `server`: the server's label (``host:port``; ``"memory"`` for the memory store).
    - `uptime`: seconds the server has been up (memcached: whole seconds).
    - `evictions`: live records the server dropped to make room since it started
      (memcached: ``evictions`` plus ``slab_reassign_evictions_nomem``); any
      records, not only this store's.
    - `started`: when the server started, on the server's own clock (memcached:
      ``time - uptime``, constant for one run of the server): with `pid`, the
      identity of this incarnation of the server.
    - `pid`: the server's process id.
    - `flushes`: ``flush_all`` commands received since it started (each may have
      dropped every record).
    """

    server: str
    uptime: float
    evictions: int
    started: float
    pid: int
    flushes: int = 0

    def lost_since(self, earlier: StoreHealth) -> bool:
        """True when records may have been lost between the `earlier` reading and
        this one: another server, a restart (another incarnation), an eviction or a
        flush in between. Conservative: any eviction counts, other applications'
        too (memcached evicts per slab class, by item size: most evictions of
        other sizes touch no record of this store, but the counters cannot say)."""
        return (
            self.server != earlier.server
            or self.started != earlier.started
            or self.pid != earlier.pid
            or self.evictions != earlier.evictions
            or self.flushes != earlier.flushes
        )


@runtime_checkable
class Store(Protocol):
    """Small records shared by every reader; `update` is atomic per key.

    **Deadlines.** Every call that reaches the server takes an optional keyword
    `deadline`: an absolute time on the running event loop's clock
    (``asyncio.get_running_loop().time()``). The whole call (waiting for a turn or
    a free connection, connecting, every round trip, `update`'s optimistic
    retries and their backoff) ends by then: if it has not finished, it raises
    `StoreError` saying the deadline passed (promptly: within a few milliseconds of
    scheduling delay). A deadline already past raises `StoreError` before anything
    is sent. ``None``: each round trip is bounded only by the store's own timeout.
    A call cut off by its deadline leaves no connection out of step: a later call
    never reads the reply of an earlier one.

    **Failures.** Every server or network failure raises `StoreError` (never a
    driver's own exception). A write (`update`, `delete`) that raised `StoreError`
    or was cancelled after its command was sent may or may not have been applied:
    callers must treat it as possibly applied.

    **Lifetimes.** `ttl` (seconds, float) is how long a record written by `update`
    lives *at least*, from the moment the call started; the store may keep it a
    little longer (memcached: up to 2 s more, whole seconds). ``0``: no expiry. A
    store keeps records at most `max_ttl` seconds (memcached: 30 days less 1 s; the
    memory store: unlimited); a larger `ttl` is clamped to `max_ttl` (logged),
    so callers that need a record to live longer must refuse instead. Any record
    may still be lost before its ttl (a memcached restart, eviction or flush):
    `health` tells when that may have happened.
    """

    name: str
    ops: int  # round trips to the server(s) so far (for metrics and benchmarks)
    max_ttl: float  # the longest ttl the store honours, seconds (math.inf: unlimited)
    # Whether a record may be lost before its ttl (memcached: a restart, an eviction,
    # a flush). False (the memory store: records live as long as the process): the
    # valve trusts a missing record and never asks `health`.
    may_lose_records: bool

    async def get(self, key: str, *, deadline: float | None = None) -> bytes | None:
        """The record's value, or None when it is missing (or expired)."""

    async def get_many(
        self, keys: Iterable[str], *, deadline: float | None = None
    ) -> dict[str, bytes]:
        """The values of the records of `keys` that exist, keyed as given; missing
        keys are absent from the result (duplicates are read once). One round trip
        per server holding any of the keys (none for no keys), run concurrently;
        `StoreError` if any of them fails. Each value is as `get` would return it,
        read at some moment during the call (not one snapshot across keys)."""

    async def update(
        self,
        key: str,
        fn: Callable[[bytes | None], tuple[bytes | None, R]],
        ttl: float | Callable[[bytes], float] = 0,
        *,
        deadline: float | None = None,
    ) -> R:
        """Atomic read-modify-write. `fn(old)` returns (new value or None to leave the
        record unchanged, result). `fn` may run several times (optimistic retries)
        and must be pure; an exception from `fn` propagates and writes nothing.
        A write sets the record's lifetime to `ttl` anew (see the class doc), or to
        `ttl(new)` when it is a function of the bytes written (called after `fn`,
        for records whose lifetime depends on what they hold); no write (None)
        leaves it as it was. Raises `StoreError` when the server cannot be reached,
        the deadline passes, or the retries are exhausted."""

    async def delete(self, key: str, *, deadline: float | None = None) -> None:
        """Remove the record; deleting a missing record is not an error."""

    async def health(
        self, key: str, *, since: float | None = None, deadline: float | None = None
    ) -> StoreHealth:
        """The health of the server that holds `key`: one round trip, or none when a
        recent reading can be shared (memcached keeps one per server for a short
        time, and concurrent callers share the one in flight).

        `since` (loop time, like `deadline`): only a reading whose request was sent
        at or after `since` will do (a time still to come counts as now). A reading
        proves nothing about records read after it was taken: to learn whether
        records read (or found missing) by a call that returned at time ``t`` may
        already have been lost, ask with ``since=t`` and compare the reading, with
        `StoreHealth.lost_since`, to one taken before those records were written.
        """

    async def close(self) -> None:
        """Let calls in flight end, then release every connection. Idempotent.
        (memcached: later calls raise `StoreError`; the memory store, which has no
        connection, stays usable.)"""
