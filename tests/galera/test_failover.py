"""?cluster=failover on a real cluster: kill -9 the node the pool uses mid-workload.

Writes wait for the cluster to evict the dead node (evs.suspect_timeout, 5 s by
default; longer on a loaded host), whichever node takes them: that wait is measured
apart, and the pool must write through another node within 2 s of it. Every call given
a deadline must return by it (+ 0.5 s), and every insert the pool reported done must be
there. The killed node then rejoins by IST."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, replace

import pytest

from mvalve_async.errors import QueueError
from mvalve_async.queues._mysql import MySQLPool, Transaction
from mvalve_async.urls import QueueSettings
from tests.galera_proc import GaleraCluster
from tests.ledger import LINES

DEADLINE = 2.0  # seconds each call is given
SLACK = 0.5


@dataclass
class Call:
    kind: str
    start: float
    end: float
    deadline: float
    ok: bool


async def test_kill9_of_the_pools_node_moves_the_pool_to_another(
    galera: GaleraCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mvalve_async.queues._mysql")
    settings = replace(QueueSettings.from_url(galera.url()), pool_size=4)
    pool = MySQLPool(settings, multi_statements=True)
    table = f"fo_{uuid.uuid4().hex[:8]}"
    loop = asyncio.get_running_loop()
    calls: list[Call] = []
    done: set[int] = set()
    stop = asyncio.Event()
    warm, settled = asyncio.Event(), asyncio.Event()
    killed_at = resumed_at = float("inf")
    after_kill: list[int] = []  # inserts started after the kill and done

    async def call(kind: str, token: int) -> None:
        nonlocal resumed_at
        start = loop.time()
        deadline = start + DEADLINE
        ok = True
        try:
            if kind == "insert":
                await pool.insert(f"INSERT INTO `{table}` (token) VALUES (%s)", [(token,)],
                                  deadline=deadline)  # fmt: skip
                done.add(token)
                if len(done) >= 200:
                    warm.set()  # the workload runs on the first node
                if start > killed_at:
                    resumed_at = min(resumed_at, loop.time())
                    after_kill.append(token)
                    if len(after_kill) >= 100:
                        settled.set()  # and goes on there
            elif kind == "select":
                await pool.fetch(f"SELECT COUNT(*) FROM `{table}`", deadline=deadline)
            else:  # a claim-like transaction: lock the oldest unclaimed row, mark it

                async def claim(tx: Transaction) -> None:
                    (found,) = await tx.run([
                        f"SELECT id FROM `{table}` WHERE claimed = 0 ORDER BY id LIMIT 1 "
                        "FOR UPDATE SKIP LOCKED"
                    ])  # fmt: skip
                    if found.rows:
                        await tx.run([(f"UPDATE `{table}` SET claimed = %s WHERE id = %s",
                                       (token, found.rows[0][0]))])  # fmt: skip

                await pool.transact(claim, deadline=deadline)
        except QueueError:
            ok = False
        calls.append(Call(kind, start, loop.time(), deadline, ok))

    async def worker(kinds: tuple[str, ...]) -> None:
        while not stop.is_set():
            for kind in kinds:
                await call(kind, secrets.randbits(62))

    try:
        await pool.connect()
        await pool.execute(
            f"CREATE TABLE `{table}` (id BIGINT AUTO_INCREMENT PRIMARY KEY, "
            "token BIGINT NOT NULL UNIQUE, claimed BIGINT NOT NULL DEFAULT 0)"
        )
        used = next(n for n in galera.nodes if (n.host, n.port) == pool.node)
        workers = [
            asyncio.create_task(worker(("insert", "select"))),
            asyncio.create_task(worker(("insert", "claim"))),
            asyncio.create_task(worker(("select",))),
        ]
        await asyncio.wait_for(warm.wait(), 30)
        killed_at, killed_wall = loop.time(), time.time()
        await asyncio.to_thread(used.kill)
        # The survivors' view without the dead node: when writes can commit again.
        await asyncio.to_thread(galera.wait_size, 2, 30)
        evicted = loop.time() - killed_at
        await asyncio.wait_for(settled.wait(), 30)
        stop.set()
        await asyncio.gather(*workers)

        took = resumed_at - killed_at
        late = [c for c in calls if c.end > c.deadline + SLACK]
        failed = [c for c in calls if not c.ok]
        records = [r for r in caplog.records if "moving to" in r.getMessage()]
        moves = [r.getMessage() for r in records]
        reads = [
            c.end - killed_at for c in calls if c.kind == "select" and c.ok and c.start > killed_at
        ]
        line = (
            f"galera failover: kill -9 of {used.name}; moved after "
            f"{records[0].created - killed_wall:.2f} s, reads resumed after {min(reads):.2f} s, "
            f"cluster evicted it after {evicted:.2f} s, writes after {took:.2f} s "
            f"(on {pool.node[0]}:{pool.node[1]}); {len(calls)} calls, "
            f"{len(failed)} failed ({sorted({c.kind for c in failed})}), none past its "
            f"deadline (latest return {max(c.end - c.deadline for c in calls):+.3f} s "
            f"from it, longest call {max(c.end - c.start for c in calls):.2f} s); "
            f"{len(moves)} move(s)"
        )
        LINES.append(line)
        print("\n" + line)
        assert evicted < 20  # the cluster's part
        assert took < evicted + 2  # the pool's part
        assert not late, late[:3]
        assert pool.node != (used.host, used.port) and pool.moves >= 1
        assert 1 <= len(moves) <= 2 and f"{used.host}:{used.port} failed" in moves[0]

        # Every insert reported done is there (read where every write has been applied).
        survivor = next(n for n in galera.nodes if n.alive)
        with survivor.connect(database="test") as conn, conn.cursor() as cur:
            cur.execute("SET SESSION wsrep_sync_wait = 1")
            cur.execute(f"SELECT token FROM `{table}`")
            present = {int(r[0]) for r in cur.fetchall()}
        assert done <= present, f"{len(done - present)} reported inserts are missing"

        # The killed node rejoins by IST (it missed little), not a full SST.
        log_before = (used.dir / "err.log").stat().st_size
        t0 = time.monotonic()
        await asyncio.to_thread(used.restart)
        rejoin = (used.dir / "err.log").read_text(errors="replace")[log_before:]
        print(f"{used.name} rejoined in {time.monotonic() - t0:.1f} s")
        assert "Receiving IST" in rejoin and "IST received" in rejoin
        assert "rsync IST completed on joiner" in rejoin  # the SST script copied nothing
    finally:
        stop.set()
        await pool.execute(f"DROP TABLE IF EXISTS `{table}`", deadline=loop.time() + 30)
        await pool.close()


async def test_a_node_that_is_not_synced_is_passed_over(
    galera: GaleraCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A desynced node (a donor, say) answers but may stall: the pool skips it."""
    first = galera.nodes[0]
    with first.connect() as conn, conn.cursor() as cur:
        cur.execute("SET GLOBAL wsrep_desync = ON")
    try:
        galera.wait_state(first, "Donor/Desynced")
        pool = MySQLPool(replace(QueueSettings.from_url(galera.url()), pool_size=2))
        try:
            loop = asyncio.get_running_loop()
            assert await pool.fetch("SELECT 1", deadline=loop.time() + 10) == [(1,)]
            assert pool.node == (galera.nodes[1].host, galera.nodes[1].port)
            moves = [r.getMessage() for r in caplog.records if "moving to" in r.getMessage()]
            assert len(moves) == 1 and "1047" in moves[0]
        finally:
            await pool.close()
    finally:
        with first.connect() as conn, conn.cursor() as cur:
            cur.execute("SET GLOBAL wsrep_desync = OFF")
        galera.wait_synced(30)
