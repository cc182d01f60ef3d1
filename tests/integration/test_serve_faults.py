"""`serve()` outlives transient queue errors (issue 20): a `QueueError` raised by
`reader.next()` (a claim, a scan or an ack that failed) or by the retry after a
failed handler is logged and the worker goes on; a bug (any other exception) and a
`SchemaError` still end `serve()`."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import aiomysql
import pytest

import mvalve_async
from mvalve_async import Message, Pipe
from mvalve_async.errors import QueueError, QueueUnavailable, SchemaError
from mvalve_async.interfaces import Claimed, Lease, Want
from mvalve_async.queues.memory import MemoryQueue
from mvalve_async.stores.memory import MemoryStore
from tests.conftest import unique_tables
from tests.faults.test_innodb_faults import pool_thread_ids
from tests.services import MYSQL_URL, require_mysql


class FlakyQueue(MemoryQueue):
    """A memory queue whose operations raise what `plan[name]` lists, one per call,
    then work (a None in the list: that call works)."""

    def __init__(self, **plan: list[BaseException | None]) -> None:
        super().__init__()
        self.plan = plan
        self.raised: Counter[str] = Counter()

    def _maybe_fail(self, name: str) -> None:
        todo = self.plan.get(name)
        if todo:
            exc = todo.pop(0)
            if exc is not None:
                self.raised[name] += 1
                raise exc

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
        self._maybe_fail("claim")
        return await super().claim(
            wants, now, lease_seconds, emergency=emergency, acks=acks, deadline=deadline
        )

    async def ack(self, leases: Sequence[Lease]) -> None:
        self._maybe_fail("ack")
        await super().ack(leases)

    async def release(self, lease: Lease, delay: float = 0.0) -> None:
        self._maybe_fail("release")
        await super().release(lease, delay)


async def serve_until(
    pipe: Pipe, expected: set[str], *, fail_first: AbstractSet[str] = frozenset(),
    timeout: float = 15, work: float = 0.0, **options: Any,
) -> Counter[str]:  # fmt: skip
    """Serve until every id of `expected` was handled once without raising; the ids
    handed to the handler, counted. The handler takes `work` seconds, and raises once
    on each of `fail_first`."""
    seen: Counter[str] = Counter()
    done: set[str] = set()
    stop = asyncio.Event()

    async def handle(msg: Message) -> None:
        seen[msg.id] += 1
        if work:
            await asyncio.sleep(work)
        if msg.id in fail_first and seen[msg.id] == 1:
            raise RuntimeError("the endpoint said 503")
        done.add(msg.id)
        if done >= expected:
            stop.set()

    async with asyncio.timeout(timeout):
        await pipe.serve(handle, stop=stop, poll=0.1, **options)
    return seen


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "mvalve_async.serve" and r.levelno == logging.WARNING
    ]


async def test_queue_errors_from_next_do_not_end_serve(caplog: pytest.LogCaptureFixture) -> None:
    """Claims fail five times (a deadlock that outlived its retries, a node that went
    away), then an ack: each is logged, the worker backs off and goes on, and every
    message is handled once."""
    queue = FlakyQueue(
        claim=[
            QueueError("deadlock found when trying to get lock"), QueueUnavailable("gone"),
            None, QueueError("x"), QueueError("y"), QueueUnavailable("z"),
        ],
        ack=[QueueError("ack lost")],
    )  # fmt: skip
    sent = [Message(f"d{i % 3}", i) for i in range(12)]
    async with Pipe(queue, MemoryStore()) as pipe:
        await pipe.writer().insert_many(sent)
        t0 = time.monotonic()
        seen = await serve_until(pipe, {m.id for m in sent}, ack_batch=4)
        took = time.monotonic() - t0
        # the last acks went out when the workers closed
        stats = await queue.stats(queue.clock.now())
    assert set(seen) == {m.id for m in sent} and max(seen.values()) == 1
    assert queue.raised["claim"] == 5
    # QueueUnavailable is the reader's own to wait out; the others reach serve
    logged = warnings_of(caplog)
    assert sum("next() failed (QueueError" in w for w in logged) >= 3, logged
    assert sum(stats.queued.values()) + sum(stats.leased.values()) == 0
    assert took < 5  # back-offs of 0.05, 0.1, 0.2, ... s, not seconds each


async def test_a_failed_retry_does_not_end_serve(caplog: pytest.LogCaptureFixture) -> None:
    """The handler fails on a message and returning it to the queue fails too: the
    worker goes on, and the message comes back when its lease ends."""
    queue = FlakyQueue(release=[QueueUnavailable("the node went away")])
    sent = [Message("d", i) for i in range(3)]
    async with Pipe(queue, MemoryStore()) as pipe:
        await pipe.writer().insert_many(sent)
        seen = await serve_until(
            pipe, {m.id for m in sent}, fail_first={sent[1].id}, lease=1.0, retry_delay=0.1
        )
    assert queue.raised["release"] == 1
    assert seen[sent[1].id] == 2 and seen[sent[0].id] == seen[sent[2].id] == 1
    logged = warnings_of(caplog)
    assert any(f"retry of {sent[1].id} failed (QueueUnavailable" in w for w in logged), logged


@pytest.mark.parametrize(
    "exc", [TypeError("a bug in the library"), SchemaError("the queue tables are missing")]
)
async def test_a_bug_or_a_missing_table_still_ends_serve(exc: Exception) -> None:
    queue = FlakyQueue(claim=[exc])
    async with Pipe(queue, MemoryStore()) as pipe:
        await pipe.writer().insert(Message("d", 1))
        with pytest.raises(ExceptionGroup) as caught:
            async with asyncio.timeout(5):
                await pipe.serve(lambda msg: asyncio.sleep(0), poll=0.1)
    assert caught.value.exceptions == (exc,)


@pytest.mark.slow
async def test_serve_goes_on_while_its_connections_are_killed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Real MariaDB: the pool's connections are killed (KILL CONNECTION) every few
    milliseconds while two workers serve 400 messages (5 ms each), some handlers
    failing: serve ends only when every message was handled, none lost."""
    require_mysql()
    t = unique_tables("sv")
    url = (
        f"{MYSQL_URL}?emergency={t.emergency[0]}&timed={t.timed[0]}&normal={t.normal[0]}"
        f"&dead={t.dead}"
    )
    sent = [Message(f"d{i % 5}", i) for i in range(400)]
    kills = 0
    async with mvalve_async.open(url, "memory://", create=True) as pipe:
        try:
            await pipe.writer().insert_many(sent)
            admin = await aiomysql.connect(
                host="127.0.0.1", user="root", db="test", autocommit=True
            )
            serving = asyncio.create_task(
                serve_until(
                    pipe, {m.id for m in sent}, fail_first={m.id for m in sent[::40]},
                    concurrency=2, lease=2.0, retry_delay=0.05, batch=8, timeout=60, work=0.005,
                )
            )  # fmt: skip
            rng = random.Random(20)
            while not serving.done():
                ids = pool_thread_ids(pipe)
                if ids:
                    async with admin.cursor() as cur:
                        try:
                            await cur.execute(f"KILL CONNECTION {rng.choice(ids)}")
                            kills += 1
                        except aiomysql.Error:
                            pass  # it had just closed
                await asyncio.sleep(rng.uniform(0.005, 0.03))
            seen = await serving
            admin.close()
            stats = await pipe.queue.stats(pipe.queue.clock.now())
        finally:
            await pipe.queue.drop_schema()
    logged = warnings_of(caplog)
    print(f"\nserve under KILL CONNECTION: {kills} kills, {len(logged)} queue errors reached "
          f"serve and were logged, {sum(seen.values()) - len(sent)} extra hand-outs")  # fmt: skip
    assert kills > 10
    assert set(seen) == {m.id for m in sent}  # none lost, serve still running at the end
    assert sum(stats.queued.values()) + sum(stats.leased.values()) == 0
