"""Reader processes on a real Galera cluster: the reader-level half of issue 20.

Each process opens its own pipe (a URL naming its node, or with ``?cluster=failover``
every node, its own first) with a memcached store shared by all, and runs `readers`
Readers, each calling ``next(timeout)`` in a loop. It reports on stdout, one JSON
line per event, times on the host's monotonic clock (system-wide on Linux):

  ["ready"]                                     connected; waits for "go" on stdin
  ["d", r, id, destination, start, seconds, deliveries, delivered_at, content]
  ["n", r, start, seconds]                      a next() that returned None
  ["e", r, start, seconds, type, text]          an exception that reached the caller
  ["c", node, t, [[row, token, id], ...], [[row, token, id], ...]]
                                                a claim that returned: its leases (row
                                                id, lease token, message id), and the
                                                acks that rode in it
  ["a", node, t, [[row, token, id], ...]]       an ack (flush) that returned
  ["end", {counter: n}]                         after "stop": the pool's retries,
                                                moves, the reader's waits

The scenarios (each returns its figures; tests/galera/test_readers.py runs small ones):
- `drain`: N messages written (through the three nodes) while readers on the three
  nodes read them. Duplicates, errors that reached a caller, lost messages, rows
  left behind; and every claim and ack the client saw OK checked against what
  committed: triggers on the queue table log each lease (id, token) a claim's
  UPDATE set and each row an ack's DELETE removed, inside the same transaction, so
  a transaction the cluster rolled back leaves no log row.
- `failover`: kill -9 of the node a reader uses, mid-drain, with ``?cluster=failover``
  URLs: how long until it claims through another node, duplicates (and whether they
  are leases it took through the dead node), lost, and every next()'s duration.
- `rates`: the fairness scenario on the cluster: a throttled hot destination with a
  backlog, a trickle to ten others, readers on the three nodes: windows over the
  rate judged on the moments next() returned, and the trickle's pick-up latency.

``python -m tests.galera.readers drain --messages 20000 --runs 10`` (or ``failover``,
``rates``) starts a cluster of its own and prints one line per run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson

import mvalve_async
from mvalve_async import Message, Rate
from mvalve_async.errors import QueueError
from mvalve_async.interfaces import Lease, Want
from mvalve_async.message import decode
from mvalve_async.queues.innodb import InnoDBQueue
from tests.galera_proc import GaleraCluster, GaleraNode
from tests.ledger import max_in_window, windows_over
from tests.services import MEMCACHED_URL

ROOT = Path(__file__).resolve().parents[2]
SLACK = 0.5  # next(timeout) must return by timeout + SLACK


# -- the reader process ---------------------------------------------------------------


def _emit(item: list[Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(item) + b"\n")
    sys.stdout.buffer.flush()


class _Counts(logging.Handler):
    """Counts the library's log lines that tell of retries and moves."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.name.endswith("_mysql"):
            if "moving to" in text:
                self.counts["moves"] += 1
            elif text.startswith("connection to"):
                self.counts["reconnects"] += 1
            elif "retrying" in text:
                self.counts["retries"] += 1  # rolled-back work sent again
        elif "queue unavailable" in text:
            self.counts["unavailable waits"] += 1
        elif "state store unavailable" in text:
            self.counts["store waits"] += 1
        elif record.levelno >= logging.WARNING:
            self.counts["other warnings"] += 1


def _named(leases: Sequence[Lease]) -> list[list[Any]]:
    return [[x.id, x.token, decode(x.blob).id] for x in leases]


def _record(queue: InnoDBQueue) -> None:
    """Report every claim and ack that returned (the client saw OK)."""
    claim, ack = queue.claim, queue.ack

    def node() -> str:
        host, port = queue.db.node
        return f"{host}:{port}"

    async def claim_recorded(
        wants: Sequence[Want], now: float, lease_seconds: float, *, emergency: int = 0,
        acks: Sequence[Lease] = (), deadline: float | None = None,
    ) -> list[Lease]:  # fmt: skip
        leases = await claim(
            wants, now, lease_seconds, emergency=emergency, acks=acks, deadline=deadline
        )
        _emit(["c", node(), time.monotonic(), _named(leases), _named(acks)])
        return leases

    async def ack_recorded(leases: Sequence[Lease]) -> None:
        await ack(leases)
        _emit(["a", node(), time.monotonic(), _named(leases)])

    queue.claim = claim_recorded  # type: ignore[method-assign]
    queue.ack = ack_recorded  # type: ignore[method-assign]


# Pipe opens of this process tried again (see `_open`).
OPENS: Counter[str] = Counter()


async def _open(
    url: str, store: str = "memory://", counts: Counter[str] = OPENS, create: bool = False
) -> mvalve_async.Pipe:
    """The pipe, connected. A connect whose first statement the server answered with
    1213 is tried again, up to 5 times, and counted ("open retries"): MySQLPool.
    _connect does not retry it (tests/integration/test_pool_connect_rolled_back.py).
    On these nodes it came from cached server threads (galera_proc: thread cache off),
    in 6 of 8 runs of 20,000 messages with the cache on."""
    for attempt in range(5):
        pipe = mvalve_async.open(url, store, create=create)
        try:
            return await pipe.connect()
        except QueueError as exc:
            await pipe.close()
            if "Deadlock" not in str(exc) or attempt == 4:
                raise
            counts["open retries"] += 1
            logging.getLogger(__name__).warning("open failed (%s); trying again", exc)
            await asyncio.sleep(0.2)
    raise AssertionError("unreachable")


async def _proc(cfg: dict[str, Any]) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    counts = _Counts()
    lib = logging.getLogger("mvalve_async")
    lib.setLevel(logging.INFO)
    lib.addHandler(counts)
    logging.getLogger().addHandler(handler)
    rate = Rate(cfg["rate"][0], per=cfg["rate"][1]) if cfg.get("rate") else None
    timeout = float(cfg["timeout"])
    async with await _open(cfg["url"], cfg["store"], counts.counts) as pipe:
        queue = pipe.queue
        assert isinstance(queue, InnoDBQueue)
        if cfg.get("record"):
            _record(queue)
        readers = [
            pipe.reader(rate=rate, lease=cfg["lease"], batch=cfg["batch"])
            for _ in range(cfg["readers"])
        ]
        _emit(["ready"])
        await asyncio.to_thread(sys.stdin.readline)  # "go"
        stop = asyncio.create_task(asyncio.to_thread(sys.stdin.readline))

        async def read(r: int) -> None:
            reader = readers[r]
            while not stop.done():
                t0 = time.monotonic()
                try:
                    msg = await reader.next(timeout=timeout)
                except Exception as exc:  # anything that reaches the caller
                    _emit(["e", r, t0, time.monotonic() - t0, type(exc).__name__, str(exc)[:300]])
                    await asyncio.sleep(0.05)
                    continue
                took = time.monotonic() - t0
                if msg is None:
                    _emit(["n", r, t0, took])
                else:
                    _emit(["d", r, msg.id, msg.destination, t0, took, msg.deliveries,
                           msg.delivered_at, msg.content])  # fmt: skip

        await asyncio.gather(*(read(r) for r in range(len(readers))))
        for reader in readers:
            await reader.close()
        _emit(["end", {**counts.counts, "pool moves": queue.db.moves}])


# -- the parent: processes and what they reported ----------------------------------------


@dataclass
class Delivery:
    proc: int
    id: str
    destination: str
    returned: float  # monotonic: when next() returned it
    deliveries: int
    delivered_at: float
    content: Any


@dataclass
class Claim:
    proc: int
    node: str
    at: float
    leases: list[tuple[int, int, str]]  # (row id, lease token, message id)
    acks: list[tuple[int, int, str]]


def _append(path: Path) -> BinaryIO:
    """The file a reader process writes its log to (the child keeps its own copy)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("ab")


def _leases(items: list[list[Any]]) -> list[tuple[int, int, str]]:
    return [(int(row), int(token), str(mid)) for row, token, mid in items]


@dataclass
class Fleet:
    """The reader processes of one run, and everything they reported."""

    configs: list[dict[str, Any]]
    logdir: Path
    deliveries: list[Delivery] = field(default_factory=list)
    calls: list[tuple[int, float, float, str]] = field(default_factory=list)  # proc, start, s
    errors: list[list[Any]] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    acks: list[Claim] = field(default_factory=list)
    ends: list[dict[str, int]] = field(default_factory=list)
    timeout: float = 1.0
    _procs: list[asyncio.subprocess.Process] = field(default_factory=list)
    _readers: list[asyncio.Task[None]] = field(default_factory=list)

    def ids(self) -> set[str]:
        return {d.id for d in self.deliveries}

    def _on(self, p: int, item: list[Any]) -> None:
        kind = item[0]
        if kind == "d":
            _, _, mid, dest, start, took, deliveries, at, content = item
            self.deliveries.append(Delivery(p, mid, dest, start + took, deliveries, at, content))
            self.calls.append((p, start, took, "d"))
        elif kind == "n":
            self.calls.append((p, item[2], item[3], "n"))
        elif kind == "e":
            self.calls.append((p, item[2], item[3], "e"))
            self.errors.append([p, *item[1:]])
        elif kind == "c":
            self.claims.append(Claim(p, item[1], item[2], _leases(item[3]), _leases(item[4])))
        elif kind == "a":
            self.acks.append(Claim(p, item[1], item[2], [], _leases(item[3])))
        elif kind == "end":
            self.ends.append(item[1])

    async def _read(self, p: int, proc: asyncio.subprocess.Process, ready: asyncio.Event) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            item = orjson.loads(raw)
            if item[0] == "ready":
                ready.set()
            else:
                self._on(p, item)

    def log_tail(self, p: int, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return (self.logdir / f"reader{p}.log").read_text(errors="replace")[-chars:]
        return ""

    async def start(self, timeout: float = 60.0) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        readies = []
        for p, cfg in enumerate(self.configs):
            with _append(self.logdir / f"reader{p}.log") as log:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "tests.galera.readers", "proc",
                    orjson.dumps(cfg).decode(), cwd=ROOT, env=env,
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                    limit=1 << 20,
                )  # fmt: skip
            self._procs.append(proc)
            ready = asyncio.Event()
            readies.append(ready)
            self._readers.append(asyncio.create_task(self._read(p, proc, ready)))
        for p, ready in enumerate(readies):
            try:
                async with asyncio.timeout(timeout):
                    while not ready.is_set():
                        if self._procs[p].returncode is not None:
                            break
                        await asyncio.wait([asyncio.create_task(ready.wait())], timeout=0.2)
            except TimeoutError:
                pass
            if not ready.is_set():
                raise RuntimeError(f"reader process {p} did not start:\n{self.log_tail(p)}")

    async def say(self, word: str) -> None:
        for proc in self._procs:
            assert proc.stdin is not None
            proc.stdin.write(word.encode() + b"\n")
            await proc.stdin.drain()

    async def stop(self, timeout: float = 60.0) -> None:
        await self.say("stop")
        try:
            async with asyncio.timeout(timeout):
                for p, proc in enumerate(self._procs):
                    if await proc.wait():
                        raise RuntimeError(
                            f"reader process {p} exited with {proc.returncode}:\n"
                            + self.log_tail(p)
                        )
                await asyncio.gather(*self._readers)
        finally:
            await self.kill()

    async def kill(self) -> None:
        for proc in self._procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)

    async def until(self, done: Any, timeout: float, what: str) -> None:
        """Until `done()` is true (polled), or RuntimeError after `timeout` seconds."""
        t0 = time.monotonic()
        while not done():
            dead = [p for p, proc in enumerate(self._procs) if proc.returncode is not None]
            if dead:
                raise RuntimeError(f"reader process {dead[0]} exited:\n{self.log_tail(dead[0])}")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"{what}: not done after {timeout} s")
            await asyncio.sleep(0.05)

    def slowest_over(self) -> float:
        """The most any next() took beyond its timeout (negative: none went past it)."""
        return max((took - self.timeout for _, _, took, _ in self.calls), default=0.0)

    def counter(self, name: str) -> int:
        """A counter summed over the processes (and this one's, for open retries)."""
        return sum(end.get(name, 0) for end in self.ends) + OPENS.get(name, 0)


# -- tables, triggers, checks -----------------------------------------------------------


class Tables:
    """Queue tables of one run, and (`logged`) the claim and ack logs kept by triggers."""

    def __init__(self, logged: bool = False) -> None:
        sfx = uuid.uuid4().hex[:8]
        self.normal, self.timed, self.emergency, self.dead = (
            f"gn_{sfx}", f"gt_{sfx}", f"ge_{sfx}", f"gd_{sfx}",
        )  # fmt: skip
        self.claimlog, self.acklog = f"gcl_{sfx}", f"gal_{sfx}"
        self.logged = logged

    def query(self) -> str:
        return (
            f"emergency={self.emergency}&timed={self.timed}&normal={self.normal}&dead={self.dead}"
        )

    def url(self, nodes: Sequence[GaleraNode]) -> str:
        """One node: a URL naming it; several: ?cluster=failover, in this order."""
        hosts = ",".join(n.address for n in nodes)
        cluster = "cluster=failover&" if len(nodes) > 1 else ""
        return f"mysql+innodb://root@{hosts}/test?{cluster}{self.query()}"

    def all(self) -> list[str]:
        return [self.normal, self.timed, self.emergency, self.dead, self.claimlog, self.acklog]

    async def create(self, cluster: GaleraCluster) -> None:
        pipe = await _open(self.url(cluster.nodes[:1]), create=True)
        await pipe.close()
        if not self.logged:
            return
        # A claim's UPDATE logs each lease it sets, an ack's DELETE each row it removes,
        # in the same transaction: what the cluster rolled back leaves no log row. (With
        # binlog_format=ROW the triggers fire on the node that runs the statement only.)
        statements = [
            f"CREATE TABLE `{self.claimlog}` (id BIGINT NOT NULL, token BIGINT NOT NULL, "
            "PRIMARY KEY (id, token))",
            f"CREATE TABLE `{self.acklog}` (id BIGINT NOT NULL, token BIGINT NOT NULL, "
            "PRIMARY KEY (id, token))",
            f"CREATE TRIGGER `{self.claimlog}_t` AFTER UPDATE ON `{self.normal}` FOR EACH ROW "
            "BEGIN IF NEW.lease_token <> 0 AND NEW.lease_token <> OLD.lease_token THEN "
            f"INSERT INTO `{self.claimlog}` VALUES (NEW.id, NEW.lease_token); END IF; END",
            f"CREATE TRIGGER `{self.acklog}_t` AFTER DELETE ON `{self.normal}` FOR EACH ROW "
            f"INSERT INTO `{self.acklog}` VALUES (OLD.id, OLD.lease_token)",
        ]
        await asyncio.to_thread(_sql, cluster.nodes[0], statements)

    async def drop(self, cluster: GaleraCluster) -> None:
        node = next(n for n in cluster.nodes if n.alive)
        names = ", ".join(f"`{t}`" for t in self.all())
        await asyncio.to_thread(_sql, node, [f"DROP TABLE IF EXISTS {names}"])

    async def read(self, cluster: GaleraCluster, statements: list[str]) -> list[list[Any]]:
        """Each statement's rows, read on a live node once it has applied every write
        the cluster committed (wsrep_sync_wait)."""
        node = next(n for n in cluster.nodes[::-1] if n.alive)
        got = await asyncio.to_thread(_sql, node, ["SET SESSION wsrep_sync_wait = 1", *statements])
        return got[1:]


def _sql(node: GaleraNode, statements: list[str]) -> list[list[Any]]:
    with node.connect(timeout=10, database="test") as conn, conn.cursor() as cur:
        out = []
        for sql in statements:
            cur.execute(sql)
            out.append(list(cur.fetchall()))
        return out


def _aborts(cluster: GaleraCluster) -> int:
    """Certification failures and brute-force aborts so far, over the live nodes (a
    node slow to answer, on a busy host, is asked again)."""
    total = 0
    for node in cluster.nodes:
        if not node.alive:
            continue
        for _ in range(10):
            s = node.status()
            if s:
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"{node.name} does not answer SHOW STATUS")
        total += int(s["wsrep_local_cert_failures"]) + int(s["wsrep_local_bf_aborts"])
    return total


def _store() -> str:
    return f"{MEMCACHED_URL}?namespace=g{uuid.uuid4().hex[:10]}"


async def _write(
    cluster: GaleraCluster, tables: Tables, messages: list[Message], nodes: Sequence[GaleraNode],
    batch: int = 100,
) -> set[str]:  # fmt: skip
    """Write `messages` in batches, the batches spread over `nodes` (a pipe each);
    the ids of those whose insert returned."""
    done: set[str] = set()
    pipes = [await _open(tables.url([n])) for n in nodes]
    try:
        chunks = [messages[i : i + batch] for i in range(0, len(messages), batch)]

        async def write(k: int) -> None:
            writer = pipes[k].writer()
            for chunk in chunks[k :: len(pipes)]:
                await writer.insert_many(chunk)
                done.update(m.id for m in chunk)

        await asyncio.gather(*(write(k) for k in range(len(pipes))))
    finally:
        for pipe in pipes:
            await pipe.close()
    return done


def _config(url: str, store: str, **kw: Any) -> dict[str, Any]:
    cfg = {"url": url, "store": store, "readers": 2, "rate": None, "lease": 30.0, "batch": 16,
           "timeout": 1.0, "record": False}  # fmt: skip
    cfg.update(kw)
    return cfg


# -- drain ------------------------------------------------------------------------------


@dataclass
class DrainFigures:
    messages: int
    seconds: float = 0.0
    delivered: int = 0
    duplicates: int = 0
    errors: int = 0
    lost: int = 0
    left: int = 0  # rows left in the table after the readers closed
    claims: int = 0
    leases: int = 0
    leases_not_committed: int = 0  # leases of client-OK claims that are not in the log
    acks: int = 0
    acks_not_committed: int = 0
    aborts: int = 0  # certification failures + brute-force aborts in the cluster
    retries: int = 0  # rolled-back work the pool sent again
    nexts: int = 0
    slowest_over: float = 0.0
    open_retries: int = 0  # pipe opens tried again after a rolled-back connect (1213)
    error_texts: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.messages} msgs in {self.seconds:.1f} s, readers on 3 nodes: delivered "
            f"{self.delivered}, duplicates {self.duplicates}, errors to caller {self.errors}, "
            f"lost {self.lost}, rows left {self.left}; {self.claims} client-OK claims "
            f"({self.leases} leases, {self.leases_not_committed} not committed), {self.acks} "
            f"acks ({self.acks_not_committed} not committed); cluster aborts {self.aborts}, "
            f"pool retries {self.retries}; {self.nexts} next() calls, slowest "
            f"{self.slowest_over:+.3f} s from its timeout; opens retried {self.open_retries}"
        )


async def drain(
    cluster: GaleraCluster, messages: int, logdir: Path, *, destinations: int = 20,
    readers: int = 2, logged: bool = True,
) -> DrainFigures:  # fmt: skip
    fig = DrainFigures(messages)
    OPENS.clear()
    tables = Tables(logged=logged)
    await tables.create(cluster)
    store = _store()
    nodes = cluster.nodes
    fleet = Fleet(
        [_config(tables.url([n]), store, readers=readers, record=logged) for n in nodes], logdir
    )
    try:
        await fleet.start()
        sent = [Message(f"d{i % destinations}", {"n": i}) for i in range(messages)]
        aborts = await asyncio.to_thread(_aborts, cluster)
        t0 = time.monotonic()
        await fleet.say("go")
        written = await _write(cluster, tables, sent, nodes)
        await fleet.until(lambda: len(fleet.ids()) >= len(written), 60 + messages / 50, "drain")
        fig.seconds = time.monotonic() - t0
        await asyncio.sleep(0.5)  # a late duplicate has its moment
        await fleet.stop()
        fig.aborts = await asyncio.to_thread(_aborts, cluster) - aborts
        reads = [f"SELECT COUNT(*) FROM `{tables.normal}`"]
        if logged:
            reads += [f"SELECT id, token FROM `{tables.claimlog}`",
                      f"SELECT id, token FROM `{tables.acklog}`"]  # fmt: skip
        got = await tables.read(cluster, reads)
        fig.left = int(got[0][0][0])
        if logged:
            claimed = {(int(i), int(t)) for i, t in got[1]}
            acked = {(int(i), int(t)) for i, t in got[2]}
            leases = [x[:2] for c in fleet.claims for x in c.leases]
            acks = [x[:2] for c in [*fleet.claims, *fleet.acks] for x in c.acks]
            fig.claims = sum(1 for c in fleet.claims if c.leases)
            fig.leases, fig.acks = len(leases), len(acks)
            fig.leases_not_committed = sum(1 for x in leases if x not in claimed)
            fig.acks_not_committed = sum(1 for x in acks if x not in acked)
    finally:
        await fleet.kill()
        await tables.drop(cluster)
    counts = Counter(d.id for d in fleet.deliveries)
    fig.delivered = len(counts)
    fig.duplicates = sum(1 for n in counts.values() if n > 1)
    fig.errors = len(fleet.errors)
    fig.error_texts = [f"{e[5]}: {e[6]}" for e in fleet.errors[:5]]
    fig.lost = len(written - set(counts))
    fig.retries = fleet.counter("retries")
    fig.nexts = len(fleet.calls)
    fig.slowest_over = fleet.slowest_over()
    fig.open_retries = fleet.counter("open retries")
    return fig


# -- failover ---------------------------------------------------------------------------


@dataclass
class FailoverFigures:
    messages: int
    killed: str = ""
    moved_after: float = 0.0  # kill -> its reader's first claim answered by another node
    resumed_after: float = 0.0  # kill -> its reader's first claim there that leased rows
    stall: float = 0.0  # the longest time after the kill without a claim that leased rows
    delivered: int = 0
    duplicates: int = 0
    duplicates_outside: int = 0  # duplicates not among `held_on_dead`
    held_on_dead: int = 0  # leases taken through the dead node and never acked
    came_back: int = 0  # rows whose lease was taken by a claim whose answer never came
    errors: int = 0
    lost: int = 0
    nexts: int = 0
    slowest_over: float = 0.0
    retries: int = 0
    moves: int = 0
    open_retries: int = 0  # pipe opens tried again after a rolled-back connect (1213)
    error_texts: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"kill -9 of {self.killed} mid-drain of {self.messages} msgs: its reader's "
            f"claims answered by another node {self.moved_after:.2f} s after, leasing "
            f"rows there {self.resumed_after:.2f} s after (no reader leased a row for "
            f"{self.stall:.2f} s); delivered {self.delivered}, "
            f"duplicates {self.duplicates} ({self.duplicates_outside} not among the "
            f"{self.held_on_dead} leases taken through the dead node and never acked), "
            f"{self.came_back} rows came back after their lease (a claim cut off at its "
            f"deadline that committed), errors to caller {self.errors}, lost {self.lost}; "
            f"{self.nexts} next() calls, slowest {self.slowest_over:+.3f} s from its "
            f"timeout; pool retries {self.retries}, moves {self.moves}; opens retried "
            f"{self.open_retries}"
        )


async def failover(
    cluster: GaleraCluster, messages: int, logdir: Path, *, lease: float = 10.0,
    timeout: float = 1.0, at: float = 0.25,
) -> FailoverFigures:  # fmt: skip
    """Readers on the three nodes, each with a ?cluster=failover URL listing every node,
    its own first, drain a backlog; when `at` of it is delivered, the first reader's
    node is killed (kill -9). Readers go on until every message was delivered, those
    whose lease a claim cut off by the kill took included (`lease` seconds later)."""
    fig = FailoverFigures(messages)
    OPENS.clear()
    tables = Tables(logged=False)
    await tables.create(cluster)
    store = _store()
    nodes = cluster.nodes
    orders = [nodes[i:] + nodes[:i] for i in range(len(nodes))]
    fleet = Fleet(
        [_config(tables.url(o), store, readers=2, record=True, lease=lease, timeout=timeout)
         for o in orders], logdir, timeout=timeout,
    )  # fmt: skip
    victim = nodes[0]
    fig.killed = f"{victim.name} ({victim.address})"
    try:
        written = await _write(cluster, tables, [
            Message(f"d{i % 20}", {"n": i}) for i in range(messages)
        ], nodes[:1], batch=500)  # fmt: skip
        await fleet.start()
        await fleet.say("go")
        await fleet.until(
            lambda: len(fleet.ids()) >= at * messages
            and any(c.proc == 0 and c.node == victim.address for c in fleet.claims),
            60, "before the kill",
        )  # fmt: skip
        killed_at = time.monotonic()
        await asyncio.to_thread(victim.kill)
        await fleet.until(lambda: len(fleet.ids()) >= len(written), 60 + lease, "drain")
        await asyncio.sleep(0.5)
        await fleet.stop()
    finally:
        await fleet.kill()
        await tables.drop(cluster)
    moved = [c for c in fleet.claims if c.proc == 0 and c.at > killed_at
             and c.node != victim.address]  # fmt: skip
    fig.moved_after = min((c.at for c in moved), default=float("inf")) - killed_at
    fig.resumed_after = min((c.at for c in moved if c.leases), default=float("inf")) - killed_at
    leased = sorted([killed_at, *(c.at for c in fleet.claims if c.leases and c.at > killed_at)])
    fig.stall = max((b - a for a, b in itertools.pairwise(leased)), default=0.0)
    # leases taken through the dead node whose ack never came back OK
    through_dead = {m for c in fleet.claims if c.node == victim.address for _, _, m in c.leases}
    held = through_dead - {m for c in [*fleet.claims, *fleet.acks] for _, _, m in c.acks}
    counts = Counter(d.id for d in fleet.deliveries)
    dups = [mid for mid, n in counts.items() if n > 1]
    fig.held_on_dead = len(held)
    fig.duplicates = len(dups)
    fig.duplicates_outside = sum(1 for mid in dups if mid not in held)
    fig.came_back = sum(1 for d in fleet.deliveries if d.deliveries > 1 and counts[d.id] == 1)
    fig.delivered = len(counts)
    fig.errors = len(fleet.errors)
    fig.error_texts = [f"{e[5]}: {e[6]}" for e in fleet.errors[:5]]
    fig.lost = len(written - set(counts))
    fig.nexts = len(fleet.calls)
    fig.slowest_over = fleet.slowest_over()
    fig.open_retries = fleet.counter("open retries")
    fig.retries = fleet.counter("retries")
    fig.moves = fleet.counter("pool moves")
    return fig


# -- rates ------------------------------------------------------------------------------


@dataclass
class RateFigures:
    seconds: float
    rate: tuple[int, float]
    hot_backlog: int
    hot_delivered: int = 0
    hot_achieved: float = 0.0  # msg/s from the hot's first full window to the end
    hot_busiest: int = 0  # most hot deliveries in one window, on next()'s returns
    windows_over: int = 0  # every destination's, on the moments next() returned
    windows_over_stamped: int = 0  # the same on delivered_at
    trickle_sent: int = 0
    trickle_delivered: int = 0
    p50: float = 0.0  # trickle pick-up latency (ms): write started -> next() returned
    p99: float = 0.0
    worst: float = 0.0
    duplicates: int = 0
    errors: int = 0
    nexts: int = 0
    slowest_over: float = 0.0
    open_retries: int = 0  # pipe opens tried again after a rolled-back connect (1213)
    error_texts: list[str] = field(default_factory=list)

    def line(self) -> str:
        n, per = self.rate
        return (
            f"hot destination at {n}/{per:g}s with {self.hot_backlog} queued, a trickle to "
            f"10 others, readers on 3 nodes, {self.seconds:g} s: hot {self.hot_delivered} "
            f"delivered, {self.hot_achieved:.1f}/s, busiest window {self.hot_busiest}; "
            f"windows over the rate {self.windows_over} (next() returns), "
            f"{self.windows_over_stamped} (delivered_at); trickle {self.trickle_delivered}"
            f"/{self.trickle_sent}, pick-up p50 {self.p50:.0f} ms, p99 {self.p99:.0f} ms, "
            f"max {self.worst:.0f} ms; duplicates {self.duplicates}, errors to caller "
            f"{self.errors}; slowest next() {self.slowest_over:+.3f} s from its timeout; "
            f"opens retried {self.open_retries}"
        )


async def rates(
    cluster: GaleraCluster, logdir: Path, *, seconds: float = 6.0, hot: int = 1000,
    rate: tuple[int, float] = (50, 1.0), readers: int = 2, timeout: float = 0.5,
) -> RateFigures:  # fmt: skip
    """The fairness scenario (bench/fairness.py) on the cluster: `hot` messages queued
    for one destination, then for `seconds` a trickle to ten others (one every 20-60
    ms, written through the first node, each stamped with the monotonic clock when its
    write began); one reader process per node. Every destination has `rate`."""
    n, per = rate
    fig = RateFigures(seconds, rate, hot)
    OPENS.clear()
    tables = Tables(logged=False)
    await tables.create(cluster)
    store = _store()
    fleet = Fleet(
        [_config(tables.url([node]), store, readers=readers, rate=list(rate), timeout=timeout)
         for node in cluster.nodes], logdir, timeout=timeout,
    )  # fmt: skip
    sent: dict[str, float] = {}
    try:
        backlog = [Message("hot", {"n": i}) for i in range(hot)]
        await _write(cluster, tables, backlog, cluster.nodes[:1], batch=500)
        await fleet.start()
        async with await _open(tables.url(cluster.nodes[:1])) as pipe:
            writer, rng = pipe.writer(), random.Random(7)
            await fleet.say("go")
            t_go = time.monotonic()
            while time.monotonic() < t_go + seconds:
                msg = Message(f"cold-{len(sent) % 10}", {"sent": time.monotonic()})
                await writer.insert(msg)
                sent[msg.id] = msg.content["sent"]
                await asyncio.sleep(rng.uniform(0.02, 0.06))
        await fleet.until(lambda: set(sent) <= fleet.ids(), 10, "the trickle's pick-up")
        await asyncio.sleep(0.5)
        await fleet.stop()
    finally:
        await fleet.kill()
        await tables.drop(cluster)
    by_dest: dict[str, list[Delivery]] = {}
    for d in fleet.deliveries:
        by_dest.setdefault(d.destination, []).append(d)
    for rows in by_dest.values():
        fig.windows_over += windows_over(sorted(d.returned for d in rows), n, per)
        fig.windows_over_stamped += windows_over(sorted(d.delivered_at for d in rows), n, per)
    hot_times = sorted(d.returned for d in by_dest.get("hot", []))
    fig.hot_delivered = len(hot_times)
    fig.hot_busiest = max_in_window(hot_times, per)
    if hot_times:
        a, b = hot_times[0] + per, t_go + seconds
        fig.hot_achieved = sum(1 for t in hot_times if a <= t < b) / max(b - a, per)
    first: dict[str, float] = {}
    for d in fleet.deliveries:
        if d.id in sent:
            first[d.id] = min(first.get(d.id, d.returned), d.returned)
    latencies = sorted((first[mid] - sent[mid]) * 1000 for mid in first)
    fig.trickle_sent, fig.trickle_delivered = len(sent), len(first)
    if latencies:
        fig.p50 = statistics.median(latencies)
        fig.p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        fig.worst = latencies[-1]
    counts = Counter(d.id for d in fleet.deliveries)
    fig.duplicates = sum(1 for k in counts.values() if k > 1)
    fig.errors = len(fleet.errors)
    fig.error_texts = [f"{e[5]}: {e[6]}" for e in fleet.errors[:5]]
    fig.nexts = len(fleet.calls)
    fig.slowest_over = fleet.slowest_over()
    fig.open_retries = fleet.counter("open retries")
    return fig


# -- by hand ----------------------------------------------------------------------------


async def _main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="mvalve-galera-"))
    logdir = Path(tempfile.mkdtemp(prefix="mvalve-galera-readers-"))
    cluster = GaleraCluster(workdir)
    try:
        cluster.start()
        print(f"cluster started in {cluster.start_seconds:.1f} s; logs in {logdir}", flush=True)
        for run in range(args.runs):
            for node in cluster.nodes:
                if not node.alive:
                    await asyncio.to_thread(node.restart)
            fig: DrainFigures | FailoverFigures | RateFigures
            if args.scenario == "drain":
                fig = await drain(cluster, args.messages, logdir, logged=not args.no_log)
            elif args.scenario == "failover":
                fig = await failover(cluster, args.messages, logdir)
            else:
                fig = await rates(cluster, logdir, seconds=args.seconds, hot=args.hot)
            print(f"run {run + 1}: {fig.line()}", flush=True)
            for text in fig.error_texts:
                print(f"  error: {text}", flush=True)
    except BaseException:
        for node in cluster.nodes:
            print(f"-- {node.name}'s log:\n{node.error_log(3000)}", flush=True)
        raise
    finally:
        cluster.remove()


def main(argv: list[str]) -> None:
    if argv[:1] == ["proc"]:
        asyncio.run(_proc(orjson.loads(argv[1])))
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("scenario", choices=["drain", "failover", "rates"])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0, help="rates: the trickle's")
    parser.add_argument("--hot", type=int, default=1000, help="rates: the hot backlog")
    parser.add_argument("--no-log", action="store_true", help="drain: no claim/ack triggers")
    asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
