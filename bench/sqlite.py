"""Scenario `sqlite`: the embedded default end to end, against a bare sqlite3 loop.

Ours: `Writer.insert_many` then one `pipe.reader()` (memory store, no rate) draining
with `next(timeout=0)` and closing (which flushes its acks), on a fresh WAL file:
encode, claim, decode, valve, ack. Baseline, same process and run, its own fresh
file with an identical table: plain `sqlite3` (no thread hop), the blobs already
encoded, looping `BEGIN IMMEDIATE; SELECT one row ORDER BY id; DELETE it; COMMIT`,
after an `executemany` INSERT. Reported: µs per message, end to end (insert and
consume), and the consume part alone.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from mvalve_async.message import encode
from mvalve_async.pipe import Pipe
from mvalve_async.registry import make_queue
from mvalve_async.stores.memory import MemoryStore
from mvalve_async.urls import QueueSettings

from .harness import US, Bench, Result, clock
from .writer import messages


async def run(b: Bench) -> Result:
    n = 200 if b.quick else 2000
    res = Result("sqlite", facts={"messages": n})
    msgs = messages(n)
    blobs = [(m.destination, encode(m)) for m in msgs]
    work = Path(tempfile.mkdtemp(prefix="mvb-sqlite-"))
    try:
        for rep in range(b.repeat):
            for side in b.order(rep):
                path = work / f"{side}-{rep}.db"
                if side == "ours":
                    total, consume = await _ours(path, msgs)
                else:
                    total, consume = _bare(path, blobs)
                res.case("insert + consume, end to end", "µs/msg", "bare sqlite3")
                getattr(res.case("insert + consume, end to end", "µs/msg"), side).append(
                    total * US / n
                )
                getattr(res.case("consume (claim, deliver, ack)", "µs/msg"), side).append(
                    consume * US / n
                )
            b.say(f"sqlite: repeat {rep + 1}/{b.repeat} done")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for case in res.cases:
        case.baseline_name = "bare sqlite3"
    return res


async def _ours(path: Path, msgs: list) -> tuple[float, float]:  # type: ignore[type-arg]
    pipe = Pipe(make_queue(QueueSettings("sqlite", path=str(path))), MemoryStore(), create=True)
    await pipe.connect()
    try:
        t0 = clock()
        await pipe.writer().insert_many(msgs)
        t1 = clock()
        reader = pipe.reader()
        got = 0
        while await reader.next(timeout=0) is not None:
            got += 1
        await reader.close()
        t2 = clock()
    finally:
        await pipe.close()
    if got != len(msgs):
        raise AssertionError(f"ours got {got} of {len(msgs)}")
    return t2 - t0, t2 - t1


def _bare(path: Path, blobs: list[tuple[str, bytes]]) -> tuple[float, float]:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(
        "CREATE TABLE q (id INTEGER PRIMARY KEY AUTOINCREMENT, destination TEXT NOT NULL, "
        "message BLOB NOT NULL, created INTEGER NOT NULL)"
    )
    try:
        t0 = clock()
        created = int(time.time() * US)
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            "INSERT INTO q (destination, message, created) VALUES (?, ?, ?)",
            [(d, blob, created) for d, blob in blobs],
        )
        db.execute("COMMIT")
        t1 = clock()
        got = 0
        while True:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT id, destination, message FROM q ORDER BY id LIMIT 1"
            ).fetchone()
            if row is None:
                db.execute("COMMIT")
                break
            db.execute("DELETE FROM q WHERE id = ?", (row[0],))
            db.execute("COMMIT")
            got += 1
        t2 = clock()
    finally:
        db.close()
    if got != len(blobs):
        raise AssertionError(f"bare got {got} of {len(blobs)}")
    return t2 - t0, t2 - t1
