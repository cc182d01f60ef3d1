"""memcached store (aiomcache): records shared by every reader of every process.

`update` is an optimistic `gets` / `cas` loop (`add` when the key is missing), so it
is atomic per key across processes, with bounded retries. `get_many` is one ``gets
k1 k2 ...`` per server holding any of the keys. `health` is one ``stats`` per server,
cached for `health_ttl` seconds and shared by concurrent callers.

Every call takes an optional `deadline` (`Store` protocol): each server command is
bounded by the earlier of its own `timeout` and that deadline, and a command cut
off in mid-reply drops its connection (below), so a deadline never leaves a
connection out of step.

Keys are `namespace + ":" + key` (UTF-8 bytes). A key that would be longer than
memcached's 250 bytes, that contains whitespace or control characters (which the
text protocol and aiomcache refuse), or whose own text starts with ``h:`` (so it can
never collide with a hashed key) is stored as ``namespace + ":h:" + sha1(key)``.

Several servers are spread by a ketama-compatible consistent-hash ring
(`uhashring`, nodes named ``host:port``, the ring looked up with the final
memcached key), so other ketama clients given the same server list and the same
keys agree on the server.

Behaviour of aiomcache 0.8 this module works around (see the tests):

- Cancelling a call in mid-command returns its connection to aiomcache's pool with
  the reply still unread, and the next call on it reads the previous reply (wrong
  values, silently). Every server command here therefore runs in its own task,
  shielded from the caller's cancellation: the caller sees `CancelledError` at
  once while the command finishes on its connection. A command that was already
  sent when its caller was cancelled (an `add` or a `cas`) may still be applied.
- On a timeout or at the caller's deadline the command is cut off in mid-reply, so
  its connection is dropped (through a partition that heals, plain aiomcache reads
  the late reply on its next call: see the tests). A write cut off that way may
  still be applied later, when the network delivers it. Each aiomcache client here
  is given exactly one connection (``pool_size=1``) and this module keeps up to
  `pool_size` such clients per server, so a timeout drops exactly the one
  connection at fault and no other caller can be handed it in between
  (aiomcache's own pool wakes waiters with released connections).
- aiomcache's pool never grows past ``pool_minsize`` (which defaults to
  ``pool_size`` and is then opened all at once on the first call); the per-client
  pool of one avoids that too.
- A connection closed by the server after a storage or delete command made
  aiomcache spin forever in `_execute_simple_command` (``readline()`` keeps
  returning ``b""`` without yielding), freezing the whole event loop; `_Client`
  overrides it to raise `ConnectionError` instead.
- `cas` returns False both on conflict and on a vanished key (both mean: retry);
  ``gets`` on a missing key returns ``(None, None)``; a cas token of 0 (memcached
  started with ``-C``) would make aiomcache send a plain ``cas`` without token.
- Expiry times are whole seconds, counted on a clock that ticks once a second, so
  an item written with exptime ``n`` lives between ``n - 1`` and ``n`` seconds
  (measured: exptime 1 lived 0.10 to 0.88 s): a `ttl` is written as
  ``ceil(ttl) + 1`` so that the record lives at least `ttl`. Values over 30 days
  (`MAX_TTL`) are read by memcached as absolute Unix times: a ttl beyond
  `max_ttl` (30 days less that second) is clamped, with a warning (the first time
  per store); callers that need longer must refuse instead (`Store.max_ttl`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import aiomcache
import uhashring
from aiomcache.pool import Connection

from mvalve_async.errors import ConfigError, StoreError
from mvalve_async.interfaces import StoreHealth
from mvalve_async.urls import hostport

__all__ = ["MAX_TTL", "MemcachedStore"]

log = logging.getLogger(__name__)

R = TypeVar("R")

#: memcached reads an exptime above 30 days as an absolute Unix time.
MAX_TTL = 30 * 24 * 3600
#: Counters of `stats` that count live items dropped to make room.
_EVICTION_STATS = (b"evictions", b"slab_reassign_evictions_nomem")
_MAX_KEY = 250  # bytes, memcached's limit
_SHA1_HEX = 40
# Characters aiomcache (and the text protocol) refuse in a key: whitespace, C0, DEL, C1.
_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")
# Backoff after a lost race: the first retry is immediate, then jittered exponential.
_BACKOFF_BASE = 0.0005
_BACKOFF_CAP = 0.02


class _Client(aiomcache.Client):
    """aiomcache client whose simple commands fail instead of spinning on EOF."""

    async def _execute_simple_command(self, conn: Connection, raw_command: bytes) -> bytes:
        conn.writer.write(raw_command)
        await conn.writer.drain()
        line = await conn.reader.readline()
        if not line.endswith(b"\r\n"):
            # aiomcache 0.8 loops on `readline()` until it sees CRLF; at EOF that
            # returns b"" forever without suspending and freezes the event loop.
            raise ConnectionError("connection closed by the server in mid-reply")
        return line[:-2]


class _Server:
    """One memcached server: up to `pool_size` single-connection aiomcache clients,
    and its last `stats` reading."""

    def __init__(self, host: str, port: int, pool_size: int) -> None:
        self.host = host
        self.port = port
        self.label = hostport(host, port)
        self.slots = asyncio.Semaphore(pool_size)
        self._idle: list[_Client] = []
        self.health: _Reading | None = None  # the newest reading done
        self.health_read: _Reading | None = None  # the newest reading in flight

    def checkout(self) -> _Client:
        # Only called while holding a slot, so at most `pool_size` clients exist.
        # The client connects lazily, on its first command.
        return self._idle.pop() if self._idle else _Client(self.host, self.port, pool_size=1)

    def checkin(self, client: _Client) -> None:
        self._idle.append(client)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            await _close_client(client)


async def _close_client(client: _Client) -> None:
    # aiomcache's close() closes the pooled (idle) connection. After a cancelled
    # command the connection has already been released to the pool, so this closes
    # it; it does not suspend on a non-empty pool.
    try:
        await client.close()
    except Exception:  # closing a broken socket: nothing more to do
        log.debug("error closing a memcached connection", exc_info=True)


class _Turn:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class _Op:
    __slots__ = ("args", "name", "sent", "server")

    def __init__(self, server: _Server, name: str, args: tuple[Any, ...]) -> None:
        self.server = server
        self.name = name
        self.args = args
        self.sent = False  # the command may have reached the server


class _Reading:
    """One `stats` round trip for `health`: `sent` is the loop time before its
    request went out, `until` the loop time until which it may be served."""

    __slots__ = ("sent", "task", "until", "value")

    def __init__(self, sent: float) -> None:
        self.sent = sent
        self.until = sent
        self.value: StoreHealth | None = None
        self.task: asyncio.Future[StoreHealth] | None = None


def _health(label: str, stats: dict[bytes, bytes | None]) -> StoreHealth:
    def number(name: bytes, default: int | None = None) -> int:
        raw = stats.get(name)
        if raw is None:
            if default is None:
                raise StoreError(f"memcached {label}: stats has no {name.decode()!r}")
            return default
        try:
            return int(raw)
        except ValueError:
            raise StoreError(f"memcached {label}: stats {name.decode()} = {raw!r}") from None

    uptime = number(b"uptime")
    return StoreHealth(
        server=label,
        uptime=float(uptime),
        evictions=sum(number(name, 0) for name in _EVICTION_STATS),
        started=float(number(b"time") - uptime),
        pid=number(b"pid"),
        flushes=number(b"cmd_flush", 0),
    )


class MemcachedStore:
    """`Store` on one or more memcached servers (aiomcache), see the module doc.

    - `servers`: ``[(host, port), ...]``, spread by a ketama ring when several.
    - `namespace`: prefix of every key (``namespace:key``).
    - `pool_size`: connections per server (opened on demand).
    - `timeout`: seconds for each server command, including the wait for a free
      connection and connecting; on expiry the connection is dropped and
      `StoreError` raised. A call's `deadline` can only shorten it.
    - `max_retries`: optimistic attempts of `update` before `StoreError`.
    - `health_ttl`: seconds a server's `health` reading is served from cache
      (0: read anew by every call that does not join one in flight; a caller's
      `since` can always ask for a newer one).
    - `ttl` (of `update`): the record lives at least `ttl` seconds (written as
      ``ceil(ttl) + 1`` whole seconds); 0 means no expiry; more than `max_ttl`
      (30 days less 1 s) is clamped to it, since memcached reads larger values as
      absolute times.

    `ops` counts round trips (each get, gets, add, cas, delete, stats, and each
    server's share of a `get_many`, is one); `retries` counts the `update`
    attempts lost to a concurrent writer.
    """

    name = "memcached"
    max_ttl = float(MAX_TTL - 1)
    may_lose_records = True  # a restart, an eviction, a flush_all

    def __init__(
        self,
        servers: Sequence[tuple[str, int]],
        *,
        namespace: str = "mvalve",
        pool_size: int = 8,
        timeout: float = 2.0,
        max_retries: int = 64,
        health_ttl: float = 0.5,
    ) -> None:
        if not servers:
            raise ConfigError("MemcachedStore needs at least one (host, port) server")
        if not namespace or _UNSAFE.search(namespace):
            raise ConfigError(
                f"memcached namespace must be non-empty, without whitespace or control "
                f"characters: {namespace!r}"
            )
        if len(namespace.encode()) + len(":h:") + _SHA1_HEX > _MAX_KEY:
            raise ConfigError(f"memcached namespace too long: {namespace!r}")
        if pool_size < 1 or max_retries < 1 or not timeout > 0 or not health_ttl >= 0:
            raise ConfigError(
                "MemcachedStore needs pool_size >= 1, max_retries >= 1, timeout > 0 "
                "and health_ttl >= 0"
            )
        self._servers: dict[str, _Server] = {}
        for host, port in servers:
            if not host or not isinstance(port, int) or not 0 < port < 65536:
                raise ConfigError(f"bad memcached server: {(host, port)!r}")
            server = _Server(host, port, pool_size)
            if server.label in self._servers:
                raise ConfigError(f"memcached server listed twice: {server.label}")
            self._servers[server.label] = server
        self._only: _Server | None = None
        self._ring: Any = None
        self._colocated: dict[tuple[str, str], str] = {}
        if len(self._servers) == 1:
            self._only = next(iter(self._servers.values()))
        else:
            self._ring = uhashring.HashRing(nodes=list(self._servers), hash_fn="ketama")
        self.namespace = namespace
        self.pool_size = pool_size
        self.timeout = timeout
        self.max_retries = max_retries
        self.health_ttl = health_ttl
        self.ops = 0
        self.retries = 0
        self._tasks: set[asyncio.Future[Any]] = set()
        self._turns: dict[bytes, _Turn] = {}
        self._closed = False
        self._clamp_logged = False

    # -- keys and servers ----------------------------------------------------

    def key_for(self, key: str) -> bytes:
        """The memcached key that stores `key`. Compatibility surface, with the ring
        (uhashring's ketama over ``host:port`` names): every process, of every
        version running at once, must find a record under the same key on the same
        server; changing either needs a version bump."""
        if not isinstance(key, str):
            raise TypeError(f"store keys are str, got {type(key).__name__}")
        full = f"{self.namespace}:{key}"
        if not key.startswith("h:") and not _UNSAFE.search(full):
            try:
                raw = full.encode()
            except UnicodeEncodeError:  # lone surrogates
                pass
            else:
                if len(raw) <= _MAX_KEY:
                    return raw
        digest = hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()
        return f"{self.namespace}:h:{digest}".encode()

    def colocated(self, base: str, key: str) -> str:
        """A key named after `base` that lives on the same server as `key` (the first
        of base:0, base:1, ... that the ring puts there; the same in every process).
        The valve keeps one epoch record per server this way: a restart of any one
        server is then seen by the destinations whose records it held."""
        target = self.server_for(key)
        cached = self._colocated.get((base, target))
        if cached is None:
            for i in range(100_000):
                if self.server_for(f"{base}:{i}") == target:
                    cached = f"{base}:{i}"
                    break
            else:  # pragma: no cover - a ring always has points for every server
                cached = base
            self._colocated[(base, target)] = cached
        return cached

    def server_for(self, key: str) -> str:
        """``host:port`` of the server that holds `key`."""
        return self._server(self.key_for(key)).label

    def _server(self, mkey: bytes) -> _Server:
        if self._only is not None:
            return self._only
        # uhashring hashes str(key): give it the text, not bytes' repr.
        return self._servers[self._ring.get_node(mkey.decode())]

    def _exptime(self, ttl: float) -> int:
        if ttl < 0 or math.isnan(ttl):
            raise ConfigError(f"ttl must be >= 0 seconds, got {ttl!r}")
        if ttl == 0:
            return 0  # never expires
        if ttl > self.max_ttl:
            if not self._clamp_logged:
                self._clamp_logged = True
                log.warning(
                    "memcached: ttl %g s clamped to %g s (memcached reads longer "
                    "expiry times as absolute dates); records may expire early",
                    ttl,
                    self.max_ttl,
                )
            return MAX_TTL
        # memcached's clock ticks once a second: exptime n lives more than n - 1 s.
        return math.ceil(ttl) + 1

    # -- one round trip ------------------------------------------------------

    def _check(self, server: _Server, what: str, deadline: float | None) -> float:
        """Refuse a call on a closed store or past its deadline; the loop's time."""
        if self._closed:
            raise StoreError(f"memcached store {self!r} is closed")
        now = asyncio.get_running_loop().time()
        if deadline is not None and deadline <= now:
            raise StoreError(
                f"memcached {server.label}: {what} not sent: the caller's deadline had "
                f"passed ({now - deadline:.3f} s ago)"
            )
        return now

    async def _call(
        self, server: _Server, name: str, *args: Any, deadline: float | None = None
    ) -> Any:
        now = self._check(server, name, deadline)
        self.ops += 1
        op = _Op(server, name, args)
        task = asyncio.ensure_future(self._run(op, now, deadline))
        self._track(task)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not op.sent:
                task.cancel()  # still waiting for a connection: nothing sent yet
            # else it completes on its own connection, which stays in sync.
            raise

    def _track(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the caller may have been cancelled

    async def _run(self, op: _Op, started: float, deadline: float | None) -> Any:
        server = op.server
        ends = started + self.timeout
        by_deadline = deadline is not None and deadline < ends  # the caller's is sooner
        if deadline is not None:
            ends = min(ends, deadline)
        try:
            async with asyncio.timeout_at(ends), server.slots:
                client = server.checkout()
                op.sent = True
                try:
                    # the aiomcache method the op names (get, gets, cas, ...): dispatch
                    result = await getattr(client, op.name)(*op.args)
                except BaseException:
                    # Timed out or failed in mid-command: the connection's state is
                    # unknown (a reply may still be on its way), never reuse it.
                    await _close_client(client)
                    raise
                server.checkin(client)
                return result
        except TimeoutError:
            elapsed = asyncio.get_running_loop().time() - started
            where = "connection dropped" if op.sent else "waiting for a free connection"
            if by_deadline:
                log.info(
                    "memcached %s: %s cut off by the caller's deadline after %.3f s (%s)",
                    server.label,
                    op.name,
                    elapsed,
                    where,
                )
                raise StoreError(
                    f"memcached {server.label}: {op.name} cut off after {elapsed:.3f} s: "
                    f"the caller's deadline passed ({where})"
                ) from None
            log.warning(
                "memcached %s: %s timed out after %g s (%s)",
                server.label,
                op.name,
                self.timeout,
                where,
            )
            raise StoreError(
                f"memcached {server.label}: {op.name} timed out after {self.timeout:g} s ({where})"
            ) from None
        except Exception as exc:
            log.debug("memcached %s: %s failed: %r", server.label, op.name, exc)
            raise StoreError(f"memcached {server.label}: {op.name} failed: {exc!r}") from exc

    # -- Store protocol ------------------------------------------------------

    async def get(self, key: str, *, deadline: float | None = None) -> bytes | None:
        mkey = self.key_for(key)
        value: bytes | None = await self._call(self._server(mkey), "get", mkey, deadline=deadline)
        return value

    async def get_many(
        self, keys: Iterable[str], *, deadline: float | None = None
    ) -> dict[str, bytes]:
        """One ``gets k1 k2 ...`` per server holding any of the keys, concurrently;
        see `Store.get_many`."""
        wanted: dict[_Server, dict[bytes, str]] = {}  # server -> {memcached key: key}
        for key in keys:
            mkey = self.key_for(key)
            wanted.setdefault(self._server(mkey), {})[mkey] = key
        if not wanted:
            return {}
        calls = [
            self._call(server, "multi_get", *mkeys, deadline=deadline)
            for server, mkeys in wanted.items()
        ]
        replies: list[tuple[bytes | None, ...]]
        if len(calls) == 1:
            replies = [await calls[0]]
        else:
            # The first failure is raised at once; the other calls end on their own
            # (each within the deadline or timeout), their connections kept in step.
            replies = await asyncio.gather(*calls)
        found: dict[str, bytes] = {}
        for mkeys, values in zip(wanted.values(), replies, strict=True):
            for key, value in zip(mkeys.values(), values, strict=True):
                if value is not None:
                    found[key] = value
        return found

    async def update(
        self,
        key: str,
        fn: Callable[[bytes | None], tuple[bytes | None, R]],
        ttl: float | Callable[[bytes], float] = 0,
        *,
        deadline: float | None = None,
    ) -> R:
        """Atomic read-modify-write by `gets` then `cas` (or `add` when missing),
        retried (up to `max_retries` attempts, with a short jittered backoff) when
        another writer got there first. See `Store.update`.

        Updates of one key through this store take turns, so they race only with
        other processes; the wait for a turn counts against `deadline`. `ttl`: see
        the class doc; it is set anew by each write. If the caller is cancelled, or
        its deadline passes, after the `add`/`cas` was sent, the write may still be
        applied (the caller sees `CancelledError` or `StoreError`)."""
        mkey = self.key_for(key)
        server = self._server(mkey)
        exptime: int | Callable[[bytes], int] = (
            (lambda new: self._exptime(ttl(new))) if callable(ttl) else self._exptime(ttl)
        )
        self._check(server, f"update of {key!r}", deadline)
        # Updates of one key from this process take turns: they would only defeat
        # each other's cas (50 tasks on one key cost ~8 retries per update and
        # could starve), so only other processes' writes are left to race with.
        turn = self._turns.get(mkey)
        if turn is None:
            turn = self._turns[mkey] = _Turn()
        turn.users += 1
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    await turn.lock.acquire()
            except TimeoutError:
                raise StoreError(
                    f"memcached {server.label}: update of {key!r} not sent: the caller's "
                    "deadline passed while it waited for another update of that key in "
                    "this process"
                ) from None
            try:
                return await self._update(server, mkey, key, fn, exptime, deadline)
            finally:
                turn.lock.release()
        finally:
            turn.users -= 1
            if not turn.users:
                del self._turns[mkey]

    async def _update(
        self,
        server: _Server,
        mkey: bytes,
        key: str,
        fn: Callable[[bytes | None], tuple[bytes | None, R]],
        exptime: int | Callable[[bytes], int],
        deadline: float | None,
    ) -> R:
        for attempt in range(self.max_retries):
            if attempt:
                self._check(server, f"update of {key!r} (attempt {attempt + 1})", deadline)
            old, token = await self._call(server, "gets", mkey, deadline=deadline)
            new, result = fn(old)
            if new is None:
                return result
            if not isinstance(new, bytes):
                raise TypeError(f"update fn must return bytes or None, got {type(new).__name__}")
            expires = exptime(new) if callable(exptime) else exptime
            if old is None:
                stored = await self._call(server, "add", mkey, new, expires, deadline=deadline)
            elif not token:
                raise StoreError(
                    f"memcached {server.label}: gets returned no cas token "
                    "(is memcached running with -C?)"
                )
            else:
                stored = await self._call(
                    server, "cas", mkey, new, token, expires, deadline=deadline
                )
            if stored:
                return result
            # add: someone created it first; cas: changed or deleted meanwhile.
            self.retries += 1
            if attempt:
                delay = min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** min(attempt, 16))
                pause = random.uniform(0, delay)
                if deadline is not None:  # then the next attempt's check raises
                    pause = min(pause, max(0.0, deadline - asyncio.get_running_loop().time()))
                await asyncio.sleep(pause)
        log.warning("memcached %s: update of %r lost %d races", server.label, key, self.max_retries)
        raise StoreError(
            f"memcached {server.label}: update of {key!r} gave up after "
            f"{self.max_retries} conflicting writes"
        )

    async def delete(self, key: str, *, deadline: float | None = None) -> None:
        mkey = self.key_for(key)
        await self._call(self._server(mkey), "delete", mkey, deadline=deadline)

    async def health(
        self, key: str, *, since: float | None = None, deadline: float | None = None
    ) -> StoreHealth:
        """The `stats` of the server holding `key` (see `Store.health`). A reading
        done less than `health_ttl` ago, or one in flight, is shared when its
        request was sent at or after `since` (``None``: any); otherwise one
        ``stats`` round trip. The round trip is bounded by `timeout`, each caller's
        wait by its own deadline (the reading goes on for the others)."""
        server = self._server(self.key_for(key))
        now = self._check(server, "stats", deadline)
        floor = -math.inf if since is None else min(since, now)
        done = server.health
        if done is not None and done.value is not None and now < done.until:
            if done.sent >= floor:
                return done.value
        reading = server.health_read
        if reading is None or reading.sent < floor:
            reading = server.health_read = _Reading(now)
            reading.task = asyncio.ensure_future(self._read_health(server, reading))
            self._track(reading.task)
        assert reading.task is not None
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(reading.task)
        except TimeoutError:
            raise StoreError(
                f"memcached {server.label}: stats cut off after "
                f"{asyncio.get_running_loop().time() - now:.3f} s: the caller's deadline "
                "passed (the reading goes on for other callers)"
            ) from None

    async def _read_health(self, server: _Server, reading: _Reading) -> StoreHealth:
        try:
            value = _health(server.label, await self._call(server, "stats"))
        finally:
            if server.health_read is reading:
                server.health_read = None
        reading.value = value
        reading.until = asyncio.get_running_loop().time() + self.health_ttl
        if server.health is None or server.health.sent <= reading.sent:
            server.health = reading
        return value

    async def close(self) -> None:
        """Let commands in flight finish (each is bounded by `timeout` or its
        caller's deadline), then close every connection. Later calls raise
        `StoreError`."""
        self._closed = True
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers.values():
            await server.close()

    def __repr__(self) -> str:
        return f"MemcachedStore(servers={list(self._servers)!r}, namespace={self.namespace!r})"
