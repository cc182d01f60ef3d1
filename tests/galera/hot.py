"""Hot rows on Galera: three clients writing through one node, or spread over three.

Each client has its own `MySQLPool` (plain pool operations, no reader engine) on a
queue-like table: a writer task inserts rows one at a time, a reader task claims
them (``SELECT ... FOR UPDATE SKIP LOCKED`` + lease ``UPDATE`` in `transact`, so
COMMIT alone) and acks them (``DELETE ... WHERE id IN (...) AND lease_token``).
Counted: the cluster's certification failures and brute-force aborts
(``wsrep_local_cert_failures``, ``wsrep_local_bf_aborts``, summed over the nodes),
the pool's retries, errors reaching the caller, rows claimed twice, and time.

``python -m tests.galera.hot [--messages 3000] [--runs 3] [--batch 8] [--preload]`` starts a
cluster of its own, alternates the two placements and prints one line per run
(tests/galera/test_hot.py runs a small version).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import statistics
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mvalve_async.errors import QueueError
from mvalve_async.queues._mysql import MySQLPool, Transaction
from mvalve_async.urls import QueueSettings
from tests.galera_proc import GaleraCluster

CLIENTS = 3


class _Retries(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage():
            self.count += 1


@dataclass
class Figures:
    placement: str
    messages: int
    seconds: float = 0.0
    cert_failures: int = 0
    bf_aborts: int = 0
    retries: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    claimed: int = 0
    claimed_twice: int = 0
    claims: int = 0

    def line(self) -> str:
        return (
            f"{self.placement:>17}: {self.messages} msgs in {self.seconds:.2f} s "
            f"({self.messages / self.seconds:.0f}/s), {self.claims} claims; cert failures "
            f"{self.cert_failures}, bf aborts {self.bf_aborts}, pool retries {self.retries}; "
            f"errors to caller {sum(self.errors.values())}, claimed twice {self.claimed_twice}"
        )


def _wsrep(cluster: GaleraCluster) -> tuple[int, int]:
    cert = bf = 0
    for node in cluster.nodes:
        s = node.status()
        cert += int(s.get("wsrep_local_cert_failures", 0))
        bf += int(s.get("wsrep_local_bf_aborts", 0))
    return cert, bf


async def measure(
    cluster: GaleraCluster, spread: bool, messages: int, batch: int = 8, preload: bool = False
) -> Figures:
    """One run: `messages` rows written and consumed by CLIENTS clients, each through
    node i (`spread`) or all through the first node. `preload`: the rows are all
    written first (a backlog: only readers run, every claim wants the same head rows)."""
    fig = Figures(("spread" if spread else "one node") + (" backlog" if preload else ""), messages)
    table = f"hot_{uuid.uuid4().hex[:8]}"
    nodes = [cluster.nodes[i if spread else 0] for i in range(CLIENTS)]
    pools = [
        MySQLPool(
            replace(QueueSettings.from_url(f"mysql+innodb://root@{n.address}/test"), pool_size=2),
            multi_statements=True,
        )
        for n in nodes
    ]
    retries = _Retries()
    logger = logging.getLogger("mvalve_async.queues._mysql")
    logger.addHandler(retries)
    level = logger.level
    logger.setLevel(logging.INFO)
    loop = asyncio.get_running_loop()
    seen: set[int] = set()
    acked = 0
    written = 0
    all_written = asyncio.Event()
    all_acked = asyncio.Event()
    try:
        for pool in pools:
            await pool.connect()
        await pools[0].execute(
            f"CREATE TABLE `{table}` (id BIGINT AUTO_INCREMENT PRIMARY KEY, "
            "destination VARCHAR(64) NOT NULL, lease_until BIGINT NOT NULL DEFAULT 0, "
            "lease_token BIGINT NOT NULL DEFAULT 0, message BLOB NOT NULL, "
            "KEY (lease_until, id))"
        )
        if preload:
            for start in range(0, messages, 500):
                rows = [
                    (f"d{i % 10}", b"x" * 100) for i in range(start, min(start + 500, messages))
                ]
                await pools[0].insert(
                    f"INSERT INTO `{table}` (destination, message) VALUES (%s, %s)", rows
                )
            written = messages
        cert0, bf0 = await asyncio.to_thread(_wsrep, cluster)
        t0 = time.monotonic()

        async def writer(pool: MySQLPool) -> None:
            nonlocal written
            while written < messages:
                written += 1
                try:
                    await pool.insert(
                        f"INSERT INTO `{table}` (destination, message) VALUES (%s, %s)",
                        [(f"d{written % 10}", b"x" * 100)],
                        deadline=loop.time() + 30,
                    )
                except QueueError as exc:
                    fig.errors[f"insert: {exc}"] += 1
                    written -= 1
            all_written.set()

        async def reader(pool: MySQLPool) -> None:
            nonlocal acked
            while not all_acked.is_set():
                token = secrets.randbits(62) + 1

                async def claim(tx: Transaction, token: int = token) -> list[int]:
                    now = int(time.time() * 1e6)
                    (found,) = await tx.run([
                        (f"SELECT id FROM `{table}` WHERE lease_until <= %s ORDER BY id "
                         "LIMIT %s FOR UPDATE SKIP LOCKED", (now, batch))
                    ])  # fmt: skip
                    ids = [int(r[0]) for r in found.rows]
                    if ids:
                        await tx.run([
                            (f"UPDATE `{table}` SET lease_until = %s, lease_token = %s "
                             f"WHERE id IN ({','.join(map(str, ids))})",
                             (now + 30_000_000, token))
                        ])  # fmt: skip
                    return ids

                try:
                    ids = await pool.transact(claim, deadline=loop.time() + 30)
                    fig.claims += 1
                    if not ids:
                        if all_written.is_set() and acked >= messages:
                            all_acked.set()
                        await asyncio.sleep(0.005)  # an empty queue: poll again
                        continue
                    fig.claimed_twice += len(seen.intersection(ids))
                    seen.update(ids)
                    fig.claimed += len(ids)
                    done = await pool.execute(
                        f"DELETE FROM `{table}` WHERE id IN ({','.join(map(str, ids))}) "
                        "AND lease_token = %s",
                        (token,),
                        deadline=loop.time() + 30,
                    )
                    acked += done
                    if acked >= messages:
                        all_acked.set()
                except QueueError as exc:
                    fig.errors[f"claim/ack: {exc}"] += 1

        await asyncio.wait_for(
            asyncio.gather(*(writer(p) for p in pools), *(reader(p) for p in pools)), 600
        )
        fig.seconds = time.monotonic() - t0
        cert1, bf1 = await asyncio.to_thread(_wsrep, cluster)
        fig.cert_failures, fig.bf_aborts = cert1 - cert0, bf1 - bf0
        fig.retries = retries.count
    finally:
        logger.removeHandler(retries)
        logger.setLevel(level)
        await pools[0].execute(f"DROP TABLE IF EXISTS `{table}`")
        for pool in pools:
            await pool.close()
    return fig


async def _main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="mvalve-galera-"))
    cluster = GaleraCluster(workdir)
    cluster.start()
    print(f"cluster started in {cluster.start_seconds:.1f} s", flush=True)
    results: dict[str, list[Figures]] = {}
    try:
        for _ in range(args.runs):
            for spread in (False, True):
                fig = await measure(cluster, spread, args.messages, args.batch, args.preload)
                results.setdefault(fig.placement, []).append(fig)
                print(fig.line(), flush=True)
    finally:
        cluster.remove()
    for placement, figs in results.items():
        med: dict[str, Any] = {
            k: statistics.median(getattr(f, k) for f in figs)
            for k in ("seconds", "cert_failures", "bf_aborts", "retries", "claims")
        }
        print(f"median {placement}: {med}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--preload", action="store_true", help="drain a backlog")
    asyncio.run(_main(parser.parse_args()))
