"""Prometheus metrics (optional extra: `pip install 'mvalve-async[prometheus]'`).

    from mvalve_async.ops.metrics import LaneDepthCollector, PrometheusObserver, start_http_server

    observer = PrometheusObserver()                    # mvalve_messages_total{destination,action}
    async with mvalve_async.open(url, observers=[observer]) as pipe, \\
               LaneDepthCollector(pipe.queue, interval=15):   # mvalve_queue_depth{lane}, ...
        start_http_server(9100)
        ...

`PrometheusObserver` counts on the hot path (a dict lookup and an increment);
`LaneDepthCollector` runs `queue.stats()` every `interval` seconds in a
background task (on MySQL that is a GROUP BY over every lane table: keep the
interval in seconds, not milliseconds, and run one collector per deployment, not
one per worker). This module imports `prometheus_client` only when one of them
is built, so the core library does not need it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from types import TracebackType
from typing import Any

from ..errors import CodecError
from ..interfaces import Lane, Queue, QueueStats, Store
from ..throttle import Record, key_for

__all__ = ["OTHER", "LaneDepthCollector", "PrometheusObserver", "start_http_server"]

log = logging.getLogger(__name__)

OTHER = "_other"  # the destination label once max_destinations labels exist
_MISSING = (
    "mvalve_async.ops.metrics needs the prometheus-client package: "
    "pip install 'mvalve-async[prometheus]'"
)


def _prometheus() -> Any:
    """The prometheus_client module, or an ImportError that names the extra."""
    try:
        return importlib.import_module("prometheus_client")
    except ImportError as exc:
        raise ImportError(_MISSING, name="prometheus_client") from exc


def _registry(client: Any, registry: Any) -> Any:
    return client.REGISTRY if registry is None else registry


class PrometheusObserver:
    """An `Observer`: `<prefix>_messages_total{destination, action}`.

    Destinations are label values: past `max_destinations` distinct ones, new
    destinations are counted under `destination="_other"` (logged once), so a
    run-away set of destinations cannot blow up the registry. Build one per
    registry (a second one with the same prefix is a duplicate metric).
    """

    def __init__(
        self, registry: Any = None, prefix: str = "mvalve", *, max_destinations: int = 1000
    ) -> None:
        client = _prometheus()
        self.max_destinations = max_destinations
        self.messages: Any = client.Counter(
            f"{prefix}_messages",
            "Messages per destination and action (enqueue, dequeue, defer, ...)",
            ["destination", "action"],
            registry=_registry(client, registry),
        )
        self._children: dict[tuple[str, str], Any] = {}
        self._destinations: set[str] = set()
        self._warned_other = False

    def event(self, action: str, destination: str, count: int = 1) -> None:
        child = self._children.get((action, destination))
        if child is None:
            child = self._child(action, destination)
        child.inc(count)

    def _child(self, action: str, destination: str) -> Any:
        label = destination
        if destination not in self._destinations:
            if len(self._destinations) < self.max_destinations:
                self._destinations.add(destination)
            else:
                label = OTHER
                self._warn_other()
        child = self.messages.labels(destination=label, action=action)
        self._children[(action, destination)] = child
        return child

    def _warn_other(self) -> None:
        if not self._warned_other:
            self._warned_other = True
            log.warning(
                "more than %d destinations: further ones are counted as destination=%r",
                self.max_destinations, OTHER,
            )  # fmt: skip


class LaneDepthCollector:
    """Gauges from `queue.stats(now)`: `<prefix>_queue_depth{lane}` (queued, not
    leased), `<prefix>_queue_leased{lane}`, `<prefix>_dead_letters`, and
    `<prefix>_queue_stats_timestamp_seconds` (when they were last read: a
    failing update leaves the gauges as they were, and this shows how old they are).
    With the pipe's `store`: `<prefix>_in_flight{destination}` and
    `<prefix>_in_flight_limit{destination}` too, for destinations with a concurrency
    limit (read from their records, over every reader of every process; at most
    `max_destinations` of them, one store round trip per server).

    `await update()` reads them once; `start()` / `close()` (or `async with`) run
    `update()` every `interval` seconds in a background task, logging failures.
    """

    def __init__(
        self,
        queue: Queue,
        *,
        registry: Any = None,
        prefix: str = "mvalve",
        interval: float = 15.0,
        store: Store | None = None,
        max_destinations: int = 1000,
    ) -> None:
        if not interval > 0:
            raise ValueError("interval must be a positive number of seconds")
        client = _prometheus()
        reg = _registry(client, registry)
        self.queue = queue
        self.store = store
        self.max_destinations = max_destinations
        self.in_flight: Any = client.Gauge(
            f"{prefix}_in_flight",
            "Messages handed out and not settled, per destination with a concurrency limit",
            ["destination"],
            registry=reg,
        )
        self.in_flight_limit: Any = client.Gauge(
            f"{prefix}_in_flight_limit",
            "The concurrency limit per destination (its readers' setting)",
            ["destination"],
            registry=reg,
        )
        self.interval = float(interval)
        self.depth: Any = client.Gauge(
            f"{prefix}_queue_depth", "Queued rows per lane, not leased", ["lane"], registry=reg
        )
        self.leased: Any = client.Gauge(
            f"{prefix}_queue_leased",
            "Rows claimed by a reader and not yet settled, per lane",
            ["lane"],
            registry=reg,
        )
        self.dead: Any = client.Gauge(
            f"{prefix}_dead_letters", "Rows in the dead-letter table", registry=reg
        )
        self.updated: Any = client.Gauge(
            f"{prefix}_queue_stats_timestamp_seconds",
            "When the queue gauges were last read (unix time)",
            registry=reg,
        )
        self.errors = 0  # failed updates
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def update(self, now: float | None = None) -> QueueStats:
        """Read `queue.stats(now)` and set the gauges; returns the stats."""
        now = time.time() if now is None else now
        stats = await self.queue.stats(now)
        for lane in Lane:
            self.depth.labels(lane=str(lane)).set(stats.queued.get(lane, 0))
            self.leased.labels(lane=str(lane)).set(stats.leased.get(lane, 0))
        self.dead.set(stats.dead)
        if self.store is not None:
            dests = sorted(stats.by_destination)[: self.max_destinations]
            found = await self.store.get_many([key_for(d) for d in dests])
            for dest in dests:
                raw = found.get(key_for(dest))
                try:
                    rec = Record.loads(raw)
                except CodecError:
                    continue
                if rec.limit:
                    self.in_flight.labels(destination=dest).set(rec.live(now))
                    self.in_flight_limit.labels(destination=dest).set(rec.limit)
        self.updated.set(now)
        return stats

    async def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                await self.update()
            except Exception as exc:
                self.errors += 1
                log.warning("queue gauges not updated: %s", " ".join(str(exc).split()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._stop.wait()

    async def start(self) -> LaneDepthCollector:
        if self._task is None or self._task.done():
            self._stop = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name="mvalve-lane-depth"
            )
        return self

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self._stop.set()
            with contextlib.suppress(Exception):
                await asyncio.shield(task)

    async def __aenter__(self) -> LaneDepthCollector:
        return await self.start()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def start_http_server(port: int, addr: str = "0.0.0.0", registry: Any = None) -> Any:
    """`prometheus_client.start_http_server`: serve `registry` (default: the global
    one) on http://addr:port/metrics from a daemon thread."""
    client = _prometheus()
    return client.start_http_server(port, addr=addr, registry=_registry(client, registry))
