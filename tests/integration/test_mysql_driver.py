"""The driver pair the library depends on: aiomysql + PyMySQL must pass `bytes`
parameters intact (aiomysql 0.3.2 with PyMySQL 1.2.x fails on every bytes
parameter, in execute and executemany; pyproject pins PyMySQL below 1.2)."""

from __future__ import annotations

import aiomysql

from tests.services import require_mysql


async def test_bytes_parameters_round_trip_through_execute_and_executemany() -> None:
    require_mysql()
    blobs = [bytes(range(256)), b"\x00'\\\"%s", b""]
    conn = await aiomysql.connect(host="127.0.0.1", user="root", db="test", autocommit=True)
    try:
        async with conn.cursor() as cur:
            await cur.execute("CREATE TEMPORARY TABLE drv (id INT PRIMARY KEY, b BLOB)")
            await cur.execute("INSERT INTO drv VALUES (%s, %s)", (0, blobs[0]))
            await cur.executemany(
                "INSERT INTO drv VALUES (%s, %s)", [(i, b) for i, b in enumerate(blobs) if i]
            )
            await cur.execute("SELECT b FROM drv ORDER BY id")
            assert [bytes(r[0]) for r in await cur.fetchall()] == blobs
    finally:
        conn.close()
