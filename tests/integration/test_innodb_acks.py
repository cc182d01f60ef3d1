"""innodb readers send acks with their next claim: one transaction, no round trip
or commit of their own, and nothing lost when that claim fails; settling and
giving back rows are one round trip each."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiomysql.connection
import pytest

from mvalve_async import Message
from mvalve_async.errors import QueueUnavailable
from mvalve_async.interfaces import Lane, Want
from mvalve_async.reader import Reader
from mvalve_async.stores.memory import MemoryStore
from mvalve_async.writer import Writer
from tests.conftest import open_queue


async def rows_left(queue: Any) -> int:
    rows = await queue.db.fetch(f"SELECT COUNT(*) FROM `{queue.tables.normal[0]}`")
    return int(rows[0][0])


def spy_statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every statement text sent from now on (until monkeypatch.undo())."""
    sent: list[str] = []
    original = aiomysql.connection.Connection._execute_command

    async def spy(self: Any, command: int, sql: Any) -> Any:
        sent.append(sql.decode() if isinstance(sql, bytes | bytearray) else str(sql))
        return await original(self, command, sql)

    monkeypatch.setattr(aiomysql.connection.Connection, "_execute_command", spy)
    return sent


async def test_acks_ride_with_the_next_claim_and_survive_its_failure(
    tmp_path: object, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue: Any = await open_queue("innodb", tmp_path, request)
    reader = Reader(queue, MemoryStore(), batch=1)
    try:
        await Writer(queue).insert_many([Message("d", i) for i in range(3)])
        sent = spy_statements(monkeypatch)
        first = await reader.next(timeout=0)
        second = await reader.next(timeout=0)
        assert first is not None and second is not None
        assert (first.content, second.content) == (0, 1)
        # the first message's ack went out inside the second claim's transaction
        claims = [s for s in sent if "SKIP LOCKED" in s]
        assert len(claims) == 2 and "DELETE" not in claims[0]
        assert claims[1].startswith("START TRANSACTION; DELETE FROM")
        assert not [s for s in sent if s.startswith("DELETE")]  # no ack of its own
        assert await rows_left(queue) == 2

        # the next claim fails once: its acks are kept and go out with the retry
        claim = queue.claim
        failed: list[int] = []

        async def flaky(*args: Any, **kwargs: Any) -> Any:
            if not failed:
                failed.append(len(kwargs["acks"]))
                raise QueueUnavailable("test: connection lost")
            return await claim(*args, **kwargs)

        monkeypatch.setattr(queue, "claim", flaky)
        third = await reader.next(timeout=5)
        assert third is not None and third.content == 2
        assert failed == [1]
        assert await rows_left(queue) == 1  # only the third, leased
        await reader.close()  # flushes the last ack
        assert await rows_left(queue) == 0
    finally:
        monkeypatch.undo()
        await reader.close()
        await queue.drop_schema()
        await queue.close()


async def test_dead_letters_take_two_round_trips_and_give_backs_one(
    tmp_path: object, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A dead letter is INSERT ... SELECT + DELETE in one packet, then COMMIT alone: a
    # COMMIT riding in the packet can report OK for a transaction Galera rolled back
    # (tests/galera). Giving back one table's rows is one autocommit UPDATE.
    queue: Any = await open_queue("innodb", tmp_path, request)
    try:
        await Writer(queue).insert_many([Message("d", i) for i in range(3)])
        first, second, third = await queue.claim([Want("d", 3)], queue.clock.now(), 30)
        sent = spy_statements(monkeypatch)
        await queue.dead([second], "test")
        await queue.give_back([first, third])
        assert len(sent) == 3
        assert sent[0].startswith("START TRANSACTION; ") and "COMMIT" not in sent[0]
        assert sent[1] == "COMMIT"
        assert sent[2].startswith("UPDATE")
        monkeypatch.undo()
        stats = await queue.stats(queue.clock.now())
        assert stats.queued[Lane.NORMAL] == 2 and stats.dead == 1
        again = await queue.claim([Want("d", 3)], queue.clock.now(), 30)
        assert [x.id for x in again] == [first.id, third.id]  # their places kept
        assert [x.deliveries for x in again] == [1, 1]  # given back: not counted
        # a stale lease deletes nothing and gives nothing back
        await queue.dead([second], "again")
        await queue.give_back([first])
        stats = await queue.stats(queue.clock.now())
        assert stats.leased[Lane.NORMAL] == 2 and stats.dead == 1
    finally:
        monkeypatch.undo()
        await queue.drop_schema()
        await queue.close()


async def test_a_claim_chosen_as_deadlock_victim_is_retried(
    tmp_path: object, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    # A real deadlock: the claim deletes its acked row A, then waits for B, which
    # another transaction holds; that one (heavier: it changed more rows) then asks
    # for A. InnoDB rolls the claim back; the pool runs it again, acks included.
    queue: Any = await open_queue("innodb", tmp_path, request)
    table = queue.tables.normal[0]
    other = await aiomysql.connect(
        host=queue.settings.host, port=queue.settings.port, user=queue.settings.user,
        password=queue.settings.password, db=queue.settings.database, autocommit=False,
    )  # fmt: skip
    try:
        await Writer(queue).insert_many([Message("d", i) for i in range(6)])
        a, b = await queue.claim([Want("d", 2)], queue.clock.now(), 30)
        async with other.cursor() as cur:
            await cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            await cur.execute("BEGIN")
            # weigh this transaction: InnoDB rolls back the one that changed least
            await cur.execute(f"UPDATE `{table}` SET deliveries = 7 WHERE id > %s", (b.id,))
            await cur.execute(f"SELECT id FROM `{table}` WHERE id = %s FOR UPDATE", (b.id,))
            caplog.set_level(logging.INFO, logger="mvalve_async.queues._mysql")
            claim = asyncio.ensure_future(
                queue.claim([Want("d", 4)], queue.clock.now(), 30, acks=[a, b])
            )
            await _until_a_lock_wait(queue)  # the claim waits for B
            await cur.execute(f"SELECT id FROM `{table}` WHERE id = %s FOR UPDATE", (a.id,))
            await other.rollback()  # the retried claim may go on
        leases = await asyncio.wait_for(claim, 10)
        assert "Deadlock" in caplog.text  # it was the victim, and ran again
        assert len(leases) == 4 and {x.id for x in leases}.isdisjoint({a.id, b.id})
        assert await rows_left(queue) == 4  # a and b are acked (deleted)
    finally:
        other.close()
        await queue.drop_schema()
        await queue.close()


async def _until_a_lock_wait(queue: Any) -> None:
    """Poll the server (it offers nothing to wait on) until the claim's DELETE waits."""
    for _ in range(500):
        rows = await queue.db.fetch(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
            "WHERE state = 'Updating' AND info LIKE 'DELETE FROM%%'"
        )
        if rows[0][0]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the claim's DELETE did not come to wait for a lock in 5 s")
