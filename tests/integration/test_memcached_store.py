"""MemcachedStore against a real memcached on 127.0.0.1:11211 (plus extra instances
started here on free loopback ports, some behind a proxy that can black-hole them):
what is specific to memcached (keys, the ring, ttl encoding, round trips, deadlines
under a partition, health readings, aiomcache's pitfalls). What every store must do
is in tests/contract/test_store_contract.py. Skipped when memcached is not
reachable, except under CI (env var CI set), where that is a failure."""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiomcache
import pytest
from uhashring import HashRing

from mvalve_async.errors import ConfigError, StoreError
from mvalve_async.interfaces import StoreHealth
from mvalve_async.stores.memcached import MAX_TTL, MemcachedStore
from tests.memcached_proc import MemcachedProcess, _free_port, _reachable, _unavailable
from tests.memcached_proxy import BlackholeProxy, hanging_port

pytestmark = pytest.mark.memcached

HOST = "127.0.0.1"
PORT = 11211


def _ns() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture(scope="session")
def memcached_up() -> None:
    if not _reachable(PORT):
        _unavailable(f"memcached is not reachable on {HOST}:{PORT}")


@pytest.fixture(scope="session")
def memcached_binary() -> None:
    if shutil.which("memcached") is None:
        _unavailable("the memcached binary is not installed")


@pytest.fixture(scope="session")
def two_servers(
    memcached_binary: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[MemcachedProcess]]:
    workdir = tmp_path_factory.mktemp("memcached")
    procs = [MemcachedProcess(workdir), MemcachedProcess(workdir)]
    try:
        for proc in procs:
            proc.start()
        yield procs
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture
def spare_server(memcached_binary: None, tmp_path: Path) -> Iterator[MemcachedProcess]:
    proc = MemcachedProcess(tmp_path)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
async def store(memcached_up: None) -> AsyncIterator[MemcachedStore]:
    s = MemcachedStore([(HOST, PORT)], namespace=_ns())
    yield s
    await s.close()


def incr(old: bytes | None) -> tuple[bytes, int]:
    n = int(old or b"0") + 1
    return str(n).encode(), n


def put(value: bytes) -> Callable[[bytes | None], tuple[bytes, None]]:
    return lambda old: (value, None)


async def meta_ttl(port: int, mkey: bytes) -> int | None:
    """Remaining ttl as memcached itself reports it (meta get): -1 = never, None = absent."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(b"mg " + mkey + b" t\r\n")
        line = await reader.readline()
    finally:
        writer.close()
    if line.startswith(b"EN"):
        return None
    assert line.startswith(b"HD "), line
    return int(line.split()[1][1:])


async def server_keys(port: int, mkeys: list[bytes]) -> set[bytes]:
    client = aiomcache.Client(HOST, port)
    try:
        values = await client.multi_get(*mkeys)
    finally:
        await client.close()
    return {k for k, v in zip(mkeys, values, strict=True) if v is not None}


# -- basics ----------------------------------------------------------------------


async def test_ops_count_round_trips(store: MemcachedStore) -> None:
    assert store.ops == 0
    await store.update("c", incr)  # gets + add
    assert store.ops == 2
    await store.update("c", incr)  # gets + cas
    assert store.ops == 4
    await store.update("c", lambda old: (None, None))  # gets only
    assert store.ops == 5
    await store.get("c")
    await store.delete("c")
    assert store.ops == 7
    assert store.retries == 0


async def test_repr_and_config_errors(store: MemcachedStore) -> None:
    assert (
        repr(store) == f"MemcachedStore(servers=['{HOST}:{PORT}'], namespace='{store.namespace}')"
    )
    with pytest.raises(ConfigError):
        MemcachedStore([])
    with pytest.raises(ConfigError):
        MemcachedStore([(HOST, PORT)], namespace="has space")
    with pytest.raises(ConfigError):
        MemcachedStore([(HOST, PORT)], namespace="n" * 208)
    with pytest.raises(ConfigError):
        MemcachedStore([(HOST, PORT), (HOST, PORT)])
    with pytest.raises(ConfigError):
        MemcachedStore([(HOST, PORT)], health_ttl=-1)
    with pytest.raises(ConfigError):
        await store.update("k", incr, ttl=-1)


async def test_closed_store_refuses(memcached_up: None) -> None:
    s = MemcachedStore([(HOST, PORT)], namespace=_ns())
    await s.update("k", incr)
    await s.close()
    await s.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        await s.get("k")


# -- ttl -------------------------------------------------------------------------


async def test_ttl_is_written_one_second_longer_and_clamped(
    store: MemcachedStore, caplog: pytest.LogCaptureFixture
) -> None:
    """memcached's clock ticks once a second, so exptime n lives more than n - 1 s:
    ttl is written as ceil(ttl) + 1 (the contract suite checks the lifetime)."""
    await store.update("frac", put(b"x"), ttl=0.2)  # ceil(0.2) + 1
    assert await meta_ttl(PORT, store.key_for("frac")) in (1, 2)
    await store.update("whole", put(b"x"), ttl=100)
    ttl = await meta_ttl(PORT, store.key_for("whole"))
    assert ttl is not None and 96 <= ttl <= 101

    await store.update("forever", put(b"x"))  # ttl=0: no expiry
    assert await meta_ttl(PORT, store.key_for("forever")) == -1

    # The longest honoured ttl is written as exactly 30 days, memcached's relative
    # maximum, without a warning.
    await store.update("longest", put(b"x"), ttl=store.max_ttl)
    ttl = await meta_ttl(PORT, store.key_for("longest"))
    assert ttl is not None and MAX_TTL - 5 <= ttl <= MAX_TTL
    assert not caplog.records

    # A year would be read as an absolute (past) time and vanish at once: clamped,
    # with a warning the first time only.
    with caplog.at_level("WARNING", logger="mvalve_async.stores.memcached"):
        await store.update("year", put(b"x"), ttl=365 * 86400)
        await store.update("year2", put(b"x"), ttl=365 * 86400)
    assert [r.getMessage() for r in caplog.records] == [
        "memcached: ttl 3.1536e+07 s clamped to 2.592e+06 s (memcached reads longer "
        "expiry times as absolute dates); records may expire early"
    ]
    assert await store.get_many(["year", "year2"]) == {"year": b"x", "year2": b"x"}
    ttl = await meta_ttl(PORT, store.key_for("year"))
    assert ttl is not None and MAX_TTL - 5 <= ttl <= MAX_TTL

    # Each successful update (cas) sets the ttl anew.
    await store.update("year", put(b"y"), ttl=100)
    ttl = await meta_ttl(PORT, store.key_for("year"))
    assert ttl is not None and 96 <= ttl <= 101


# -- keys ------------------------------------------------------------------------


async def test_long_and_unsafe_keys_are_hashed(store: MemcachedStore) -> None:
    ns = store.namespace
    plain_max = "p" * (250 - len(ns) - 1)
    keys = {
        "plain": False,
        plain_max: False,
        plain_max + "p": True,
        "a" * 300: True,
        "a" * 301: True,
        "with space": True,
        "tab\there": True,
        "new\nline": True,
        "nul\x00": True,
        "c1\x85": True,
        "nbsp\u00a0": True,
        "ünïcödé✓": False,
        "é" * 200: True,  # 200 characters, but 400 bytes
        "h:" + "0" * 40: True,  # never mistaken for a hashed key
        "": False,
    }
    mkeys = set()
    for key, hashed in keys.items():
        mkey = store.key_for(key)
        assert len(mkey) <= 250
        if hashed:
            digest = hashlib.sha1(key.encode()).hexdigest()
            assert mkey == f"{ns}:h:{digest}".encode(), key
        else:
            assert mkey == f"{ns}:{key}".encode(), key
        mkeys.add(mkey)
    assert len(mkeys) == len(keys)

    for i, key in enumerate(keys):
        await store.update(key, put(f"v{i}".encode()))
    for i, key in enumerate(keys):
        assert await store.get(key) == f"v{i}".encode(), key
    for key in keys:
        await store.delete(key)
        assert await store.get(key) is None


# -- atomicity -------------------------------------------------------------------


async def test_concurrent_updates_count_every_attempt(store: MemcachedStore) -> None:
    # (Atomicity itself is in the contract suite.)
    async def worker() -> list[int]:
        return [await store.update("counter", incr) for _ in range(20)]

    results = await asyncio.gather(*(worker() for _ in range(50)))
    # Every attempt is a gets plus an add/cas.
    assert store.ops == 2 * (1000 + store.retries)
    assert await store.get("counter") == b"1000"
    # Every update saw a distinct value: none was lost or applied twice.
    assert sorted(n for r in results for n in r) == list(range(1, 1001))


async def test_two_stores_racing(memcached_up: None) -> None:
    ns = _ns()
    a = MemcachedStore([(HOST, PORT)], namespace=ns)
    b = MemcachedStore([(HOST, PORT)], namespace=ns)
    try:

        async def worker(s: MemcachedStore) -> list[int]:
            return [await s.update("counter", incr) for _ in range(20)]

        results = await asyncio.gather(*(worker(a if i % 2 else b) for i in range(50)))
        assert a.ops + b.ops == 2 * (1000 + a.retries + b.retries)
        assert await a.get("counter") == b"1000"
        assert sorted(n for r in results for n in r) == list(range(1, 1001))
    finally:
        await a.close()
        await b.close()


async def test_update_gives_up_after_max_retries(
    store: MemcachedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = MemcachedStore([(HOST, PORT)], namespace=store.namespace, max_retries=3)
    try:
        await store.update("k", incr)
        call = s._call

        async def meddling_call(server: object, name: str, *args: object, **kw: object) -> object:
            if name == "cas":  # another writer gets in between our gets and our cas
                await store.update("k", incr)
            return await call(server, name, *args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(s, "_call", meddling_call)
        with pytest.raises(StoreError, match="gave up after 3"):
            await s.update("k", lambda old: (b"mine", None))
        assert s.retries == 3
        assert await store.get("k") == b"4"
    finally:
        await s.close()


# -- several servers ---------------------------------------------------------------


def _ketama_continuum(nodes: list[str]) -> tuple[list[int], list[str]]:
    """libketama's continuum for equally weighted servers, written independently."""
    points: list[tuple[int, str]] = []
    for node in nodes:
        for i in range(40):
            digest = hashlib.md5(f"{node}-{i}".encode()).digest()
            for h in range(4):
                points.append((int.from_bytes(digest[4 * h : 4 * h + 4], "little"), node))
    points.sort()
    return [p for p, _ in points], [n for _, n in points]


def _ketama_node(continuum: tuple[list[int], list[str]], mkey: bytes) -> str:
    hashes, nodes = continuum
    h = int.from_bytes(hashlib.md5(mkey).digest()[:4], "little")
    return nodes[bisect.bisect_left(hashes, h) % len(hashes)]


async def test_consistent_hashing_over_two_servers(two_servers: list[MemcachedProcess]) -> None:
    servers = [(HOST, p.port) for p in two_servers]
    labels = [p.label for p in two_servers]
    ns = _ns()
    s = MemcachedStore(servers, namespace=ns)
    reverse = MemcachedStore(servers[::-1], namespace=ns)
    try:
        keys = [f"dest-{i}" for i in range(200)] + ["a" * 300, "with space"]
        for key in keys:
            await s.update(key, put(key.encode()))

        mkeys = [s.key_for(k) for k in keys]
        held = {p.label: await server_keys(p.port, mkeys) for p in two_servers}
        assert held[labels[0]].isdisjoint(held[labels[1]])
        continuum = _ketama_continuum(labels)
        ring = HashRing(nodes=labels, hash_fn="ketama")
        for key, mkey in zip(keys, mkeys, strict=True):
            where = s.server_for(key)
            assert mkey in held[where], key  # stored exactly where it is looked up
            assert reverse.server_for(key) == where  # independent of the list order
            assert _ketama_node(continuum, mkey) == where  # libketama's choice
            assert ring.get_node(mkey.decode()) == where
            assert await reverse.get(key) == key.encode()
        for label in labels:  # spread over both (about half each)
            assert len(held[label]) >= len(keys) // 4, {k: len(v) for k, v in held.items()}
    finally:
        await s.close()
        await reverse.close()


# -- failures ----------------------------------------------------------------------


async def test_unreachable_server_raises_store_error_quickly() -> None:
    port = _free_port()  # nothing listens there
    s = MemcachedStore([(HOST, port)], namespace=_ns())
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match=f"{HOST}:{port}"):
            await s.get("k")
        with pytest.raises(StoreError, match=f"{HOST}:{port}"):
            await s.update("k", incr)
        with pytest.raises(StoreError, match=f"{HOST}:{port}"):
            await s.delete("k")
        assert time.monotonic() - started < 1.0
    finally:
        await s.close()


async def test_server_killed_then_restarted(spare_server: MemcachedProcess) -> None:
    s = MemcachedStore([(HOST, spare_server.port)], namespace=_ns(), pool_size=4)
    try:
        await asyncio.gather(*(s.update("k", incr) for _ in range(20)))  # 4 connections
        assert await s.get("k") == b"20"

        spare_server.stop()
        started = time.monotonic()
        for call in (lambda: s.get("k"), lambda: s.update("k", incr), lambda: s.delete("k")):
            for _ in range(5):  # every pooled connection is found dead, none hangs
                with pytest.raises(StoreError, match=spare_server.label):
                    await call()
        assert time.monotonic() - started < 2.0

        spare_server.start()
        assert await s.get("k") is None  # a fresh memcached: empty
        await asyncio.gather(*(s.update("k", incr) for _ in range(20)))
        assert await s.get("k") == b"20"
    finally:
        await s.close()


async def test_cas_disabled_server_is_reported(memcached_binary: None, tmp_path: Path) -> None:
    proc = MemcachedProcess(tmp_path, "-C")  # memcached without CAS: tokens are 0
    proc.start()
    s = MemcachedStore([(HOST, proc.port)], namespace=_ns())
    try:
        await s.update("k", incr)  # add needs no token
        with pytest.raises(StoreError, match="-C"):
            await s.update("k", incr)
    finally:
        await s.close()
        proc.stop()


async def test_timeout_drops_the_connection() -> None:
    """A server that never answers: StoreError after `timeout`, and the connection
    (with its late reply) is closed rather than reused."""
    connections = 0
    closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while await reader.read(1024):
            pass  # read commands, never answer
        closed.set()
        writer.close()

    server = await asyncio.start_server(silent, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    s = MemcachedStore([(HOST, port)], namespace=_ns(), timeout=0.2, pool_size=1)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match=rf"{HOST}:{port}: get timed out"):
            await s.get("k")
        assert 0.15 < time.monotonic() - started < 1.0
        await asyncio.wait_for(closed.wait(), 2.0)
        with pytest.raises(StoreError, match="timed out"):
            await s.update("k", incr)
        assert connections == 2  # a new connection, not the abandoned one
    finally:
        await s.close()
        server.close()
        await server.wait_closed()


_EOF_SCRIPT = textwrap.dedent(
    """
    import asyncio, time
    from mvalve_async.errors import StoreError
    from mvalve_async.stores.memcached import MemcachedStore

    async def handle(reader, writer):
        line = await reader.readline()          # gets
        writer.write(b"END\\r\\n")
        await writer.drain()
        await reader.readline()                  # add ... header
        writer.close()                           # close without any reply

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        s = MemcachedStore([("127.0.0.1", port)], timeout=2.0)
        ticks = 0
        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1
        t = asyncio.create_task(tick())
        try:
            await s.update("k", lambda old: (b"v", None))
        except StoreError as exc:
            print("StoreError", exc)
        t.cancel()
        await s.close()

    asyncio.run(main())
    """
)


def test_server_closing_mid_reply_does_not_freeze_the_loop() -> None:
    """aiomcache 0.8 spins forever (without yielding) when the server closes the
    connection before answering a storage command; run in a subprocess so that a
    regression fails instead of hanging the test session."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-c", _EOF_SCRIPT], capture_output=True, text=True, timeout=30, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("StoreError"), proc.stdout + proc.stderr
    assert "127.0.0.1:" in proc.stdout and "closed" in proc.stdout


# -- cancellation ----------------------------------------------------------------


def _cancel_after(task: asyncio.Task[object], hops: int) -> None:
    """Cancel `task` after `hops` turns of the event loop (0: at the next turn)."""
    loop = asyncio.get_running_loop()

    def step(left: int) -> None:
        if left:
            loop.call_soon(step, left - 1)
        else:
            task.cancel()

    loop.call_soon(step, hops)


async def test_cancellation_never_mixes_replies(memcached_up: None) -> None:
    """Cancel tasks at every stage of their commands (waiting for a turn or a
    connection, gets in flight, cas in flight) while many run over 2 connections;
    afterwards every reply must still belong to its own request, and each counter
    must hold exactly the updates that were applied."""
    rng = random.Random(1234)
    s = MemcachedStore([(HOST, PORT)], namespace=_ns(), pool_size=2)
    try:
        plain = [f"k{i}" for i in range(20)]
        for key in plain:
            await s.update(key, put(f"value-of-{key}".encode()))

        counters = [f"ctr{i}" for i in range(4)]

        def add_id(
            ident: str, cancel_hops: int | None = None
        ) -> Callable[[bytes | None], tuple[bytes, int]]:
            first = True

            def fn(old: bytes | None) -> tuple[bytes, int]:
                nonlocal first
                if first and cancel_hops is not None:
                    # Runs once gets has answered: the cancel then lands while the
                    # add/cas is being sent or awaited.
                    current = asyncio.current_task()
                    assert current is not None
                    _cancel_after(current, cancel_hops)
                first = False
                ids = old.decode().split(",") if old else []
                assert ident not in ids  # would mean an update applied twice
                return ",".join([*ids, ident]).encode(), len(ids) + 1

            return fn

        async def reader(key: str) -> None:
            assert await s.get(key) == f"value-of-{key}".encode()

        started: dict[str, str] = {}  # update id -> counter
        tasks: dict[str, asyncio.Task[object]] = {}
        task: asyncio.Task[object]
        for i in range(400):
            dice = rng.random()
            if i % 2:
                ident, ctr = f"u{i}", counters[i % len(counters)]
                started[ident] = ctr
                hops = rng.randrange(4) if dice < 0.25 else None
                tasks[ident] = task = asyncio.create_task(s.update(ctr, add_id(ident, hops)))
            else:
                task = asyncio.create_task(reader(plain[i % len(plain)]))
                tasks[f"g{i}"] = task
            if 0.25 <= dice < 0.6:
                # At any stage: waiting for a turn or a connection, or in flight.
                _cancel_after(task, rng.randrange(400))
        await asyncio.gather(*tasks.values(), return_exceptions=True)

        cancelled = {name for name, t in tasks.items() if t.cancelled()}
        failed = {
            name: t.exception() for name, t in tasks.items() if not t.cancelled() and t.exception()
        }
        assert not failed, failed  # a mixed-up reply would fail a reader's assert
        assert len(cancelled) > 80
        completed = {n for n in started if n not in cancelled}

        stored: dict[str, list[str]] = {}
        for ctr in counters:
            raw = await s.get(ctr)
            stored[ctr] = raw.decode().split(",") if raw else []
            assert len(stored[ctr]) == len(set(stored[ctr])), "an update applied twice"
        everything = {ident for ids in stored.values() for ident in ids}
        for ident in completed:  # each completed update is in its own counter
            assert ident in stored[started[ident]]
        for ctr, ids in stored.items():  # and nothing that was not started there
            assert all(started[i] == ctr for i in ids)
        landed_cancelled = everything - completed
        # A cancelled update whose cas had already been sent may still be applied
        # (its caller sees CancelledError): the counter is then one more than the
        # updates that returned, never less, never a duplicate.
        assert landed_cancelled <= cancelled
        assert sum(len(ids) for ids in stored.values()) == len(completed) + len(landed_cancelled)
        assert landed_cancelled, "no cancellation hit an update in mid-cas: test too weak"
        # Results returned to completed updates: position in their counter.
        for ident in completed:
            result = tasks[ident].result()
            assert stored[started[ident]][int(str(result)) - 1] == ident

        # The connections are still in step: many concurrent reads and writes.
        for _ in range(3):
            await asyncio.gather(*(reader(k) for k in plain * 5))
        before = {ctr: len(ids) for ctr, ids in stored.items()}
        await asyncio.gather(
            *(s.update(c, add_id(f"after{i}")) for i, c in enumerate(counters * 10))
        )
        for ctr in counters:
            raw = await s.get(ctr)
            assert raw is not None and len(raw.decode().split(",")) == before[ctr] + 10
    finally:
        await s.close()


async def test_caller_cancellation_is_prompt(memcached_up: None) -> None:
    """The caller sees CancelledError at once, even though the command it had sent
    finishes in the background."""
    s = MemcachedStore([(HOST, PORT)], namespace=_ns(), pool_size=1)
    try:
        await s.update("k", incr)
        task = asyncio.create_task(s.update("k", incr))
        _cancel_after(task, 3)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await s.get("k") in (b"1", b"2")  # applied or not, never garbled
        assert await s.update("k", incr) in (2, 3)
    finally:
        await s.close()


# -- get_many ----------------------------------------------------------------------


@pytest.fixture
async def two_proxies(two_servers: list[MemcachedProcess]) -> AsyncIterator[list[BlackholeProxy]]:
    proxies = [await BlackholeProxy(p.port).start() for p in two_servers]
    try:
        yield proxies
    finally:
        for proxy in proxies:
            proxy.heal()
            await proxy.close()


def _gets_lines(proxy: BlackholeProxy) -> list[list[bytes]]:
    """The keys of each get/gets command the proxy forwarded."""
    return [line.split()[1:] for line in proxy.requests() if line.split()[0] in (b"get", b"gets")]


async def test_get_many_is_one_round_trip_per_server(two_proxies: list[BlackholeProxy]) -> None:
    """One `gets` per server, carrying exactly that server's memcached keys (hashed
    and long keys as `key_for` makes them); missing keys absent from the result."""
    s = MemcachedStore([(HOST, p.port) for p in two_proxies], namespace=_ns())
    try:
        keys = [f"dest-{i}" for i in range(100)] + ["a" * 300, "with space", "é" * 200, "h:1"]
        for key in keys:
            await s.update(key, put(key.encode()))
        asked = [*keys, "missing-1", "missing 2", *keys[:10]]  # duplicates read once
        before = {p.label: len(_gets_lines(p)) for p in two_proxies}
        ops = s.ops
        assert await s.get_many(asked) == {k: k.encode() for k in keys}
        assert s.ops == ops + 2
        for proxy in two_proxies:
            lines = _gets_lines(proxy)[before[proxy.label] :]
            assert len(lines) == 1, lines  # one round trip to this server
            expected = {s.key_for(k) for k in set(asked) if s.server_for(k) == proxy.label}
            assert sorted(lines[0]) == sorted(expected)
            assert len(expected) > 10  # both servers hold some of the keys

        # Keys that all live on one server: one round trip, to that server only.
        label = two_proxies[0].label
        mine = [k for k in keys if s.server_for(k) == label][:5]
        other = two_proxies[1]
        count = len(_gets_lines(other))
        ops = s.ops
        assert await s.get_many(mine) == {k: k.encode() for k in mine}
        assert s.ops == ops + 1
        assert len(_gets_lines(other)) == count
    finally:
        await s.close()


async def test_get_many_of_a_large_batch(store: MemcachedStore) -> None:
    """memcached takes a multiget line of any length (here about 400 KB)."""
    keys = [f"{i:06d}-" + "k" * (230 - len(store.namespace)) for i in range(2000)]
    assert all(len(store.key_for(k)) > 230 for k in keys)
    for i, key in enumerate(keys[::2]):
        await store.update(key, put(b"%d" % i * 100), ttl=60)  # a shared server: tidy
    ops = store.ops
    got = await store.get_many(keys)
    assert store.ops == ops + 1
    assert got == {key: b"%d" % i * 100 for i, key in enumerate(keys[::2])}


# -- deadlines: a server black-holed behind a proxy -------------------------------


@pytest.fixture
async def partitioned(
    spare_server: MemcachedProcess,
) -> AsyncIterator[tuple[MemcachedStore, BlackholeProxy]]:
    """A store (4 connections, a 5 s command timeout: the deadlines bind first) on a
    private memcached behind a proxy that can black-hole it."""
    proxy = await BlackholeProxy(spare_server.port).start()
    s = MemcachedStore([(HOST, proxy.port)], namespace=_ns(), pool_size=4, timeout=5.0)
    try:
        yield s, proxy
    finally:
        proxy.heal()
        await s.close()
        await proxy.close()


def _now() -> float:
    return asyncio.get_running_loop().time()


async def _timed(call: Callable[[float], Any], within: float) -> tuple[float, BaseException | Any]:
    """Run `call(deadline)` with deadline = now + `within`: (elapsed, result or error)."""
    started = _now()
    try:
        result = await call(started + within)
    except Exception as exc:
        return _now() - started, exc
    return _now() - started, result


async def test_blackholed_calls_end_by_their_deadline(
    partitioned: tuple[MemcachedStore, BlackholeProxy],
) -> None:
    s, proxy = partitioned
    values = {f"k{i}": f"value-{i}".encode() for i in range(8)}
    for key, value in values.items():
        await s.update(key, put(value))
    await asyncio.gather(*(s.get(k) for k in values))  # several pooled connections
    proxy.blackhole()

    calls: dict[str, Callable[[float], Any]] = {
        "get": lambda d: s.get("k0", deadline=d),
        "get_many": lambda d: s.get_many(["k1", "k2", "nope"], deadline=d),
        # (Held writes still land after healing: they touch keys of their own.)
        "update": lambda d: s.update("w-update", incr, ttl=60, deadline=d),
        "delete": lambda d: s.delete("w-delete", deadline=d),
        "health": lambda d: s.health("k5", deadline=d),
        "get (waits for a connection)": lambda d: s.get("k6", deadline=d),
    }
    for _ in range(2):  # pooled connections first, then new ones opened in the partition
        outcomes = await asyncio.gather(*(_timed(call, 1.0) for call in calls.values()))
        print("black-holed, s:", [round(elapsed, 4) for elapsed, _ in outcomes])
        for name, (elapsed, outcome) in zip(calls, outcomes, strict=True):
            assert isinstance(outcome, StoreError), (name, outcome)
            assert "deadline passed" in str(outcome), (name, outcome)
            assert 1.0 <= elapsed <= 1.1, (name, elapsed)

    proxy.heal()
    elapsed, value = await _timed(lambda d: s.get("k7", deadline=d), 1.0)
    assert value == values["k7"] and elapsed < 0.1, elapsed
    print(f"first get after healing: {elapsed:.4f} s")
    # No connection reads a reply meant for another request: every key, many times
    # over, concurrently, comes back with its own value.
    for _ in range(5):
        keys = random.sample(sorted(values), len(values))
        got = await asyncio.gather(*(s.get(k, deadline=_now() + 1.0) for k in keys))
        assert got == [values[k] for k in keys]
        assert await s.get_many(keys) == values
    assert await s.update("k0", put(b"after"), deadline=_now() + 1.0) is None
    assert await s.get("k0") == b"after"


async def test_a_reused_connection_would_read_a_stale_reply(
    spare_server: MemcachedProcess,
) -> None:
    """Control for the test above: through the same proxy, plain aiomcache, whose
    call is cut off by a timeout, reads the previous request's reply after healing.
    The proxy does reproduce the hazard that the store's connection handling avoids."""
    proxy = await BlackholeProxy(spare_server.port).start()
    client = aiomcache.Client(HOST, proxy.port, pool_size=1)
    try:
        await client.set(b"k1", b"one")
        await client.set(b"k2", b"two")
        proxy.blackhole()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.get(b"k1"), 0.2)
        proxy.heal()
        assert await client.get(b"k2") != b"two"  # it read k1's late reply instead
    finally:
        await client.close()
        await proxy.close()


async def test_a_write_cut_off_by_its_deadline_may_land_later(
    partitioned: tuple[MemcachedStore, BlackholeProxy],
) -> None:
    """The partition starts between the `gets` and the `cas`: the caller gets
    StoreError at its deadline, and the held `cas` still reaches the server when the
    network heals (TCP would deliver it the same way). Callers must treat a write
    that raised as possibly applied."""
    s, proxy = partitioned
    await s.update("k", put(b"1"))

    def then_partition(old: bytes | None) -> tuple[bytes, None]:
        proxy.blackhole()
        return b"2", None

    elapsed, outcome = await _timed(lambda d: s.update("k", then_partition, deadline=d), 0.5)
    assert isinstance(outcome, StoreError) and "cas cut off" in str(outcome), outcome
    assert 0.5 <= elapsed <= 0.6
    proxy.heal()
    limit = _now() + 2.0
    while await s.get("k") != b"2":  # the server applies the late cas
        assert _now() < limit, "the held cas never landed"
        await asyncio.sleep(0.01)


async def test_deadline_bounds_the_wait_for_a_connection_and_a_turn(
    partitioned: tuple[MemcachedStore, BlackholeProxy],
) -> None:
    s, proxy = partitioned
    one = MemcachedStore([(HOST, proxy.port)], namespace=s.namespace, pool_size=1, timeout=5.0)
    try:
        await one.get("warm")
        proxy.blackhole()
        # The first holds the only connection; the second waits for it.
        slow, waiting = await asyncio.gather(
            _timed(lambda d: one.get("a", deadline=d), 1.0),
            _timed(lambda d: one.get("b", deadline=d), 0.3),
        )
        assert isinstance(waiting[1], StoreError), waiting
        assert "waiting for a free connection" in str(waiting[1])
        assert 0.3 <= waiting[0] <= 0.4, waiting
        assert isinstance(slow[1], StoreError) and 1.0 <= slow[0] <= 1.1, slow

        # Updates of one key from one process take turns: the second waits its turn.
        first, second = await asyncio.gather(
            _timed(lambda d: s.update("t", incr, deadline=d), 1.0),
            _timed(lambda d: s.update("t", incr, deadline=d), 0.3),
        )
        assert isinstance(second[1], StoreError), second
        assert "waited for another update" in str(second[1])
        assert 0.3 <= second[0] <= 0.4, second
        assert isinstance(first[1], StoreError) and 1.0 <= first[0] <= 1.1, first
    finally:
        proxy.heal()
        await one.close()


async def test_deadline_bounds_connecting() -> None:
    with hanging_port() as port:
        s = MemcachedStore([(HOST, port)], namespace=_ns(), timeout=5.0)
        try:
            elapsed, outcome = await _timed(lambda d: s.get("k", deadline=d), 0.5)
            assert isinstance(outcome, StoreError), outcome
            assert "deadline passed (connection dropped)" in str(outcome)
            assert 0.5 <= elapsed <= 0.6, elapsed
        finally:
            await s.close()


async def test_deadline_bounds_update_retries(
    store: MemcachedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that wins every race: the update gives up at its deadline, not after
    its retries (of which it would have many more)."""
    s = MemcachedStore([(HOST, PORT)], namespace=store.namespace, max_retries=10**6)
    try:
        await store.update("k", incr)
        call = s._call

        async def meddling_call(server: object, name: str, *args: object, **kw: object) -> object:
            if name == "cas":
                await store.update("k", incr)
            return await call(server, name, *args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(s, "_call", meddling_call)
        elapsed, outcome = await _timed(lambda d: s.update("k", put(b"mine"), deadline=d), 0.3)
        assert isinstance(outcome, StoreError) and "deadline" in str(outcome), outcome
        assert 0.3 <= elapsed <= 0.4, elapsed
        assert s.retries > 5
        assert await store.get("k") != b"mine"
    finally:
        await s.close()


async def test_get_many_with_one_server_blackholed(two_proxies: list[BlackholeProxy]) -> None:
    s = MemcachedStore([(HOST, p.port) for p in two_proxies], namespace=_ns(), timeout=5.0)
    try:
        keys = [f"dest-{i}" for i in range(20)]
        for key in keys:
            await s.update(key, put(b"x"))
        dark, lit = two_proxies
        dark.blackhole()
        elapsed, outcome = await _timed(lambda d: s.get_many(keys, deadline=d), 1.0)
        assert isinstance(outcome, StoreError) and dark.label in str(outcome), outcome
        assert 1.0 <= elapsed <= 1.1, elapsed
        on_lit = [k for k in keys if s.server_for(k) == lit.label]
        assert on_lit and await s.get_many(on_lit, deadline=_now() + 1.0) == dict.fromkeys(
            on_lit, b"x"
        )
        dark.heal()
        assert await s.get_many(keys, deadline=_now() + 1.0) == dict.fromkeys(keys, b"x")
    finally:
        await s.close()


# -- health --------------------------------------------------------------------------


async def _health_after_restart(s: MemcachedStore, key: str) -> StoreHealth:
    # The pooled connection to the old server is found dead once (StoreError).
    for _ in range(2):
        try:
            return await s.health(key)
        except StoreError:
            pass
    return await s.health(key)


async def test_health_of_a_restarted_server(spare_server: MemcachedProcess) -> None:
    """A restart shows as a new incarnation (start time, pid) with a small uptime.
    A cached reading cannot show what happened after it was taken: `since` asks for
    one taken after the read whose result is in question."""
    s = MemcachedStore([(HOST, spare_server.port)], namespace=_ns(), health_ttl=60)
    try:
        await s.update("k", put(b"v"))
        before = await s.health("k")
        assert before.server == spare_server.label
        assert before.pid == spare_server.pid
        assert before.evictions == 0 and before.flushes == 0

        spare_server.stop()
        spare_server.start()
        missing = None
        for _ in range(3):  # the pooled connection to the old server fails once
            try:
                missing = await s.get("k")
                break
            except StoreError:
                pass
        else:
            raise AssertionError("the restarted server did not answer")
        read_at = _now()
        assert missing is None  # the record is gone with the old server...
        assert await s.health("k") is before  # ...which a cached reading cannot show

        after = await s.health("k", since=read_at)
        assert after.pid == spare_server.pid
        assert (after.started, after.pid) != (before.started, before.pid)
        assert after.started >= before.started
        assert after.uptime < 5  # memcached starts counting at 2 s
        assert after.lost_since(before)
    finally:
        await s.close()


async def test_health_since_never_takes_an_older_reading(memcached_up: None) -> None:
    s = MemcachedStore([(HOST, PORT)], namespace=_ns(), health_ttl=60)
    try:
        ops = s.ops
        first = await s.health("k")
        assert await s.health("k") is first and s.ops == ops + 1  # cached
        assert await s.health("k", since=_now() - 60) is first  # old enough a wish
        t = _now()
        fresh = await asyncio.gather(*(s.health("k", since=t) for _ in range(10)))
        assert s.ops == ops + 2  # ten callers, one new round trip
        assert all(h is fresh[0] for h in fresh) and fresh[0] is not first
        assert await s.health("k") is fresh[0]  # the newest reading is the cached one

        # A reading in flight whose request went out before `since` is not joined.
        early = asyncio.create_task(s.health("k", since=_now()))
        await asyncio.sleep(0)  # its request is on its way
        await asyncio.sleep(0.002)  # and the clock moves on
        late = await s.health("k", since=_now())
        assert await early is not late
        assert s.ops == ops + 4
    finally:
        await s.close()


async def test_health_is_cached_and_shared(two_servers: list[MemcachedProcess]) -> None:
    s = MemcachedStore([(HOST, p.port) for p in two_servers], namespace=_ns(), health_ttl=0.3)
    try:
        keys = [f"dest-{i}" for i in range(50)]
        ops = s.ops
        readings = await asyncio.gather(*(s.health(k) for k in keys))
        assert s.ops == ops + 2  # 50 callers, two servers: two stats round trips
        for key, health in zip(keys, readings, strict=True):
            assert health.server == s.server_for(key)
        assert await s.health(keys[0]) is readings[0]  # from the cache
        assert s.ops == ops + 2
        await asyncio.sleep(0.35)  # the cache's lifetime passes
        fresh = await s.health(keys[0])
        assert s.ops == ops + 3
        assert fresh is not readings[0] and not fresh.lost_since(readings[0])
    finally:
        await s.close()


async def test_health_sees_a_flush(spare_server: MemcachedProcess) -> None:
    s = MemcachedStore([(HOST, spare_server.port)], namespace=_ns(), health_ttl=0)
    client = aiomcache.Client(HOST, spare_server.port)
    try:
        before = await s.health("k")
        await client.flush_all()
        after = await s.health("k")
        assert after.flushes == before.flushes + 1 and after.lost_since(before)
    finally:
        await client.close()
        await s.close()


async def _flood(port: int, size: int, count: int) -> None:
    """Another application's client writes `count` keys of `size` bytes."""
    client = aiomcache.Client(HOST, port, pool_size=4)
    try:
        value = b"x" * size
        for start in range(0, count, 500):
            await asyncio.gather(
                *(
                    client.set(b"other-app:%d:%d" % (size, i), value)
                    for i in range(start, start + 500)
                )
            )
    finally:
        await client.close()


@pytest.mark.slow
async def test_health_sees_evictions_and_a_record_can_be_evicted(
    memcached_binary: None, tmp_path: Path
) -> None:
    """In an 8 MB memcached another client's keys evict, `evictions` rises, and a
    record of the store can be evicted while the server stays up: the loss a
    restart check cannot see. (memcached keeps one LRU per slab class: a flood of
    1 KB values evicts 1 KB items; a record of a few hundred bytes goes once items
    of its own size class flood in.)"""
    proc = MemcachedProcess(tmp_path, "-m", "8")
    proc.start()
    s = MemcachedStore([(HOST, proc.port)], namespace=_ns(), health_ttl=0)
    try:
        record = b"r" * 200  # the size of a valve record
        await s.update("dest:slow", put(record), ttl=3600)
        start = await s.health("dest:slow")
        assert start.evictions == 0

        await _flood(proc.port, 1024, 40_000)  # 40 MB of 1 KB values into 8 MB
        flooded = await s.health("dest:slow")
        assert flooded.evictions > 10_000, flooded
        assert flooded.lost_since(start)
        assert (flooded.started, flooded.pid) == (start.started, start.pid)  # no restart

        # The record is not read meanwhile (a read would keep it warm in the LRU).
        await _flood(proc.port, len(record), 40_000)
        assert await s.get("dest:slow") is None, "the record survived: test too weak"
        evicted = await s.health("dest:slow")
        assert evicted.evictions > flooded.evictions
        assert (evicted.started, evicted.pid) == (start.started, start.pid)  # still up
        assert evicted.lost_since(flooded)
        print(f"evictions: {flooded.evictions} after 1 KB, {evicted.evictions} after 200 B")
    finally:
        await s.close()
        proc.stop()
