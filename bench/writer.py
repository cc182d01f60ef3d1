"""Scenario `writer`: `Writer.insert` one at a time and `insert_many` in batches of
100, against bare aiomysql `INSERT` / `executemany` of the same blobs into an
identical table (same DDL as the normal lane, autocommit on like the pool).

Figures are µs per message; messages are built before the clock starts (our side
pays validation and encoding, the baseline gets the encoded blobs).
"""

from __future__ import annotations

import time
from typing import Any

from mvalve_async import Message
from mvalve_async.message import encode
from mvalve_async.pipe import Pipe
from mvalve_async.registry import make_queue
from mvalve_async.stores.memory import MemoryStore

from .harness import US, Bench, QueryCounter, Result, clock

BATCH = 100
BODY = "x" * 160  # a typical small payload: ~250 bytes encoded


def messages(n: int) -> list[Message]:
    return [Message(f"dest-{i % 10}", {"seq": i, "body": BODY}) for i in range(n)]


async def run(b: Bench) -> Result:
    n = 200 if b.quick else 2000
    res = Result("writer", facts={"messages": n, "batch": BATCH})
    msgs = messages(n)
    raw_rows = [(m.destination, encode(m)) for m in msgs]
    res.facts["blob_bytes"] = len(raw_rows[0][1])
    tables = b.tables("w")
    raw = b.raw_table("w")
    pipe = Pipe(make_queue(b.queue_settings(tables)), MemoryStore(), create=True)
    await pipe.connect()
    await b.create_raw(raw)
    conn = await b.connect(autocommit=True)
    try:
        writer = pipe.writer()
        sql = f"INSERT INTO `{raw}` (destination, message, created) VALUES (%s, %s, %s)"
        # warm up both sides (connections, statement paths), then start clean
        for m in msgs[:20]:
            await writer.insert(m)
        await _bare_one(conn, sql, raw_rows[:20])
        for rep in range(b.repeat):
            for mode in ("insert", "insert_many"):
                for side in b.order(rep):
                    await b.sql(f"TRUNCATE TABLE `{tables.normal[0]}`")
                    await b.sql(f"TRUNCATE TABLE `{raw}`")
                    q0, t0 = QueryCounter.count, clock()
                    if side == "ours" and mode == "insert":
                        for m in msgs:
                            await writer.insert(m)
                    elif side == "ours":
                        for i in range(0, n, BATCH):
                            await writer.insert_many(msgs[i : i + BATCH])
                    elif mode == "insert":
                        await _bare_one(conn, sql, raw_rows)
                    else:
                        await _bare_many(conn, sql, raw_rows)
                    elapsed, queries = clock() - t0, QueryCounter.count - q0
                    target = tables.normal[0] if side == "ours" else raw
                    rows = await b.count_rows([target])
                    if rows != n:
                        raise AssertionError(f"{side} {mode}: {rows} rows, expected {n}")
                    name = "insert, one at a time" if mode == "insert" else f"insert_many({BATCH})"
                    case = res.case(name, "µs/msg")
                    getattr(case, side).append(elapsed * US / n)
                    case.add(f"{side} msgs/s", n / elapsed)
                    case.add(f"{side} statements/msg", queries / n)
            b.say(f"writer: repeat {rep + 1}/{b.repeat} done")
    finally:
        conn.close()
        await pipe.close()
    return res


async def _bare_one(conn: Any, sql: str, rows: list[tuple[str, bytes]]) -> None:
    async with conn.cursor() as cur:
        for dest, blob in rows:
            await cur.execute(sql, (dest, blob, int(time.time() * US)))


async def _bare_many(conn: Any, sql: str, rows: list[tuple[str, bytes]]) -> None:
    async with conn.cursor() as cur:
        for i in range(0, len(rows), BATCH):
            created = int(time.time() * US)
            await cur.executemany(sql, [(d, blob, created) for d, blob in rows[i : i + BATCH]])
