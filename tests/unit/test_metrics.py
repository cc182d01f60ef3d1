"""Prometheus metrics: message counters from a run on memory://, queue gauges from
`queue.stats()`, and a clear ImportError when prometheus_client is missing."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import urllib.request
from pathlib import Path

import pytest

import mvalve_async
from mvalve_async import Lane, Message, Rate
from mvalve_async.interfaces import QueueStats

try:
    from prometheus_client import CollectorRegistry
except ImportError:  # the optional extra; CI installs it (.ci/run), so it must not skip there
    if os.environ.get("CI"):
        raise
    pytest.skip("needs pip install 'mvalve-async[prometheus]'", allow_module_level=True)

from mvalve_async.ops.metrics import (
    OTHER,
    LaneDepthCollector,
    PrometheusObserver,
    start_http_server,
)


def value(registry: object, name: str, **labels: str) -> float | None:
    got = registry.get_sample_value(name, labels)  # type: ignore[attr-defined]
    return None if got is None else float(got)


async def test_counters_after_a_run_on_memory() -> None:
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry)
    async with mvalve_async.open("memory://", "memory://", observers=[observer]) as pipe:
        writer = pipe.writer()
        await writer.insert_many([Message("a", i) for i in range(3)])
        await writer.insert(Message("b", "urgent", emergency=True))
        await writer.insert(Message("b", "dropped by the emergency"))
        reader = pipe.reader(rate=Rate(2, per=60))
        got = [await reader.next(timeout=1) for _ in range(3)]
        assert [m.content for m in got if m] == ["urgent", 0, 1]
        assert await reader.next(timeout=0.1) is None  # a:2 deferred, b: dropped
        await reader.close()

    def total(action: str, destination: str) -> float | None:
        return value(registry, "mvalve_messages_total", destination=destination, action=action)

    assert total("enqueue", "a") == 3 and total("enqueue", "b") == 2
    assert total("dequeue", "a") == 2 and total("dequeue", "b") == 1
    assert total("defer", "a") == 1 and total("drop", "b") == 1
    assert total("ack", "a") == 2 and total("ack", "b") == 1
    assert total("abort", "a") is None  # never happened: no series


def test_prefix_and_the_destination_cap(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry, prefix="sms", max_destinations=2)
    with caplog.at_level(logging.WARNING, "mvalve_async.ops.metrics"):
        for dest in ("a", "b", "c", "d", "a"):
            observer.event("enqueue", dest, 2)
    assert value(registry, "sms_messages_total", destination="a", action="enqueue") == 4
    assert value(registry, "sms_messages_total", destination=OTHER, action="enqueue") == 4
    assert value(registry, "sms_messages_total", destination="c", action="enqueue") is None
    assert caplog.text.count("more than 2 destinations") == 1


async def test_gauges_from_queue_stats() -> None:
    registry = CollectorRegistry()
    async with mvalve_async.open("memory://", "memory://") as pipe:
        writer = pipe.writer()
        await writer.insert_many([Message("a", i) for i in range(4)])
        await writer.insert(Message("a", "later", delay=3600))
        await writer.insert(Message("b", "now", emergency=True))
        reader = pipe.reader()
        msg = await reader.next(timeout=1)
        assert msg is not None and msg.content == "now"
        await reader.reject(msg, "test")  # one dead letter
        msg = await reader.next(timeout=1)  # leased: batch claims lease more rows
        collector = LaneDepthCollector(pipe.queue, registry=registry)
        stats = await collector.update(now=1234.5)
        await reader.close()

    def depth(lane: str) -> float | None:
        return value(registry, "mvalve_queue_depth", lane=lane)

    assert isinstance(stats, QueueStats)
    for lane in Lane:
        assert depth(str(lane)) == stats.queued[lane]
        assert value(registry, "mvalve_queue_leased", lane=str(lane)) == stats.leased[lane]
    assert depth("timed") == 1 and depth("emergency") == 0
    assert stats.queued[Lane.NORMAL] + stats.leased[Lane.NORMAL] == 4
    assert value(registry, "mvalve_dead_letters") == 1
    assert value(registry, "mvalve_queue_stats_timestamp_seconds") == 1234.5


async def test_in_flight_gauges_from_the_store() -> None:
    registry = CollectorRegistry()
    async with mvalve_async.open("memory://", "memory://") as pipe:
        await pipe.writer().insert_many([Message("smtp", i) for i in range(3)])
        await pipe.writer().insert(Message("free", "x"))
        readers = [pipe.reader(concurrency_limits={"smtp": 2}, batch=1) for _ in range(3)]
        got = [await r.next(timeout=1) for r in readers]
        assert sorted(m.destination for m in got if m) == ["free", "smtp", "smtp"]
        collector = LaneDepthCollector(pipe.queue, registry=registry, store=pipe.store)
        await collector.update(now=pipe.queue.clock.now())
        assert value(registry, "mvalve_in_flight", destination="smtp") == 2
        assert value(registry, "mvalve_in_flight_limit", destination="smtp") == 2
        assert value(registry, "mvalve_in_flight", destination="free") is None  # no limit
        for r in readers:
            await r.close()  # settles: the places are free
        await collector.update(now=pipe.queue.clock.now())
        assert value(registry, "mvalve_in_flight", destination="smtp") == 0


class FlakyQueue:
    """Stats from a queue that fails every other time."""

    name = "flaky"

    def __init__(self) -> None:
        self.calls = 0

    async def stats(self, now: float) -> QueueStats:
        self.calls += 1
        if self.calls % 2 == 0:
            from mvalve_async.errors import QueueUnavailable

            raise QueueUnavailable("cannot reach the server")
        zero = {lane: 0 for lane in Lane}
        return QueueStats({**zero, Lane.NORMAL: self.calls}, zero, 7, {})


async def test_collector_loop_updates_and_survives_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    queue = FlakyQueue()
    collector = LaneDepthCollector(queue, registry=registry, interval=0.01)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, "mvalve_async.ops.metrics"):
        async with collector:
            for _ in range(200):
                if queue.calls >= 4:
                    break
                await asyncio.sleep(0.01)
    calls = queue.calls
    assert calls >= 4 and collector.errors == calls // 2
    await asyncio.sleep(0.05)
    assert queue.calls == calls  # closed: no more updates
    last_good = calls if calls % 2 else calls - 1
    assert value(registry, "mvalve_queue_depth", lane="normal") == last_good
    assert value(registry, "mvalve_dead_letters") == 7
    assert "queue gauges not updated: cannot reach the server" in caplog.text


def test_http_server_passthrough() -> None:
    registry = CollectorRegistry()
    PrometheusObserver(registry).event("enqueue", "a")
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            body = reply.read().decode()
        assert 'mvalve_messages_total{action="enqueue",destination="a"} 1.0' in body
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_import_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    import mvalve_async.ops.metrics as metrics  # the module itself imports without it

    for build in (
        lambda: metrics.PrometheusObserver(),
        lambda: metrics.LaneDepthCollector(object()),  # type: ignore[arg-type]
        lambda: metrics.start_http_server(0),
    ):
        with pytest.raises(ImportError, match=r"pip install 'mvalve-async\[prometheus\]'"):
            build()


def test_core_library_does_not_import_prometheus() -> None:
    import subprocess

    code = (
        "import sys, mvalve_async, mvalve_async.ops, mvalve_async.ops.metrics, "
        "mvalve_async.ops.statslog; "
        "assert 'prometheus_client' not in sys.modules, 'imported eagerly'"
    )
    root = Path(mvalve_async.__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=root)
