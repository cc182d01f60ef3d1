"""MySQLPool keeps connections out of aiomysql's pool between uses (its acquire and
release cost more than a small statement): a waiting task must still get one, a
connection that died or sat idle must not be used again, and the pool's size holds."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import aiomysql
import pytest

from mvalve_async.queues import _mysql
from mvalve_async.queues._mysql import MySQLPool
from mvalve_async.urls import QueueSettings
from tests.conftest import MYSQL_URL
from tests.services import require_mysql


async def open_pool(size: int) -> MySQLPool:
    require_mysql()
    settings = replace(QueueSettings.from_url(MYSQL_URL), pool_size=size)
    pool = MySQLPool(settings)
    await pool.connect()
    return pool


async def connection_id(pool: MySQLPool) -> int:
    rows = await pool.fetch("SELECT CONNECTION_ID()")
    return int(rows[0][0])


async def test_tasks_beyond_the_pool_size_wait_their_turn_and_all_run() -> None:
    pool = await open_pool(2)
    try:
        ids = await asyncio.wait_for(
            asyncio.gather(*(pool.fetch("SELECT CONNECTION_ID(), SLEEP(0.05)") for _ in range(6))),
            10,
        )
        assert len({rows[0][0] for rows in ids}) <= 2  # never more than pool_size
        assert pool._pool.size <= 2
    finally:
        await pool.close()


async def test_an_idle_connection_is_reused_and_a_killed_one_is_not() -> None:
    pool = await open_pool(3)
    try:
        first = await connection_id(pool)
        assert await connection_id(pool) == first  # the warm one, not a new one
        killer = await aiomysql.connect(
            host=pool.settings.host,
            port=pool.settings.port,
            user=pool.settings.user,
            db=pool.settings.database,
        )
        async with killer.cursor() as cur:  # from outside: it dies while idle
            await cur.execute(f"KILL {first}")
        killer.close()
        assert await connection_id(pool) != first  # replaced, the caller sees no error
    finally:
        await pool.close()


async def test_a_connection_idle_too_long_goes_back_to_aiomysql(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = await open_pool(2)
    try:
        await connection_id(pool)
        assert len(pool._idle) == 1
        monkeypatch.setattr(_mysql, "IDLE_KEEP", 0.0)
        released: list[Any] = []
        inner_release = pool._pool.release
        monkeypatch.setattr(pool._pool, "release", lambda c: released.append(c) or inner_release(c))
        await connection_id(pool)  # handed back (aiomysql checks it), then acquired there
        assert len(released) == 1 and len(pool._idle) == 1 and pool._pool.size == 1
    finally:
        await pool.close()


async def test_close_hands_idle_connections_back_so_the_pool_closes_at_once() -> None:
    pool = await open_pool(2)
    await asyncio.gather(connection_id(pool), connection_id(pool))
    inner: Any = pool._pool
    await asyncio.wait_for(pool.close(), 2)
    assert inner.closed and inner.size == 0
