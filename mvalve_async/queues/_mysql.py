"""The aiomysql pool shared by a pipe's readers and writers, and error translation.

Every connection runs with autocommit on and READ COMMITTED isolation: a
REPEATABLE READ poller would read an old snapshot, and its empty SKIP LOCKED
polls would take gap locks that block writers' INSERTs. Transactions are
always ended with an explicit COMMIT/ROLLBACK, and COMMIT is always a round
trip of its own (see `Transaction`); a connection whose state is unknown (an
error or a cancellation mid-statement) is closed, never returned to the pool.

Work the server rolled back (deadlock, lock wait timeout, a Galera certification
failure or brute-force abort, a Galera node not ready) is sent again until the
caller's deadline. With a deadline, no call waits past it, however long a node
takes to answer. A URL naming the nodes of one cluster (``?cluster=failover``)
makes the pool use one node and move to the next when that one fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiomysql
import pymysql
from pymysql.constants import CLIENT

from ..errors import QueueBusy, QueueError, QueueUnavailable, SchemaError
from ..interfaces import Lane
from ..tuning import IDLE_KEEP, RETRY_WINDOW
from ..urls import QueueSettings, Tables, hostport
from ._common import DEAD_COLUMNS, dead_letter, table_names, tally

__all__ = [
    "MySQLPool",
    "Result",
    "Statement",
    "Transaction",
    "count_dead",
    "drop_tables",
    "purge_lanes",
    "read_dead_letters",
    "translate",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Server/client error codes that mean "this connection is unusable".
_CONNECTION_LOST = {2003, 2006, 2013, 2055, 1927, 4031}
_NOT_SENT = {2006}  # the request never reached the server: safe to resend anything
# The server rolled the statement (lock wait timeout) or the whole transaction
# (deadlock; on Galera also a certification failure or a brute-force abort by a
# replicated write, both reported as 1213) back, and the connection is closed after
# it: nothing of it stays, so anything can be resent. Concurrent SKIP LOCKED claims
# meet these now and then; on Galera, claims through different nodes often.
_ROLLED_BACK = {1205, 1213}
# Galera: "WSREP has not yet prepared node for application use": the node is not in
# the primary component, or not synced. The statement did not run.
_NOT_READY = {1047}
_ACCESS = {1044, 1045, 1698}
_NO_TABLE = {1146}
_SYNCED = "4"  # wsrep_local_state of a Synced Galera node

# A statement for `Transaction.run`: SQL with no parameters (sent as it is, so a
# literal `%` needs no escaping), or (SQL, parameters) escaped client-side.
Statement = str | tuple[str, Any]


def _code(exc: BaseException) -> int | None:
    """The MySQL error code a driver error carries first in its args, if any."""
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def translate(exc: BaseException, where: str) -> QueueError:
    """Driver error -> library error. Never includes a password (drivers don't echo
    it, and `where` is a masked URL)."""
    code = _code(exc)
    if code in _ACCESS:
        return QueueUnavailable(f"access denied by {where} (check the user and password)")
    if code in _NO_TABLE:
        return SchemaError(f"{where}: {exc.args[1]} (run `mvalve create` first)")
    if isinstance(exc, TimeoutError):
        return QueueUnavailable(f"{where} did not answer in time")
    if code == 2003 and isinstance(exc.__cause__, ConnectionRefusedError):  # aiomysql's 2003
        address = where.partition("://")[2].partition("/")[0].rpartition("@")[2]
        return QueueUnavailable(f"cannot reach {where}: nothing listens on {address}")
    if code in _CONNECTION_LOST or isinstance(exc, OSError):
        return QueueUnavailable(f"cannot reach {where}: {type(exc).__name__} {code or ''}".strip())
    if code in _NOT_READY:
        return QueueUnavailable(f"{where}: node not ready ({exc.args[1]})")
    if code in _ROLLED_BACK:
        return QueueBusy(f"{where}: {exc.args[1]}")
    detail = exc.args[1] if len(getattr(exc, "args", ())) > 1 else exc
    return QueueError(f"{where}: {detail}")


def _lost(exc: BaseException) -> bool:
    return _code(exc) in _CONNECTION_LOST or isinstance(exc, OSError | asyncio.TimeoutError)


class _NotSent(Exception):
    """Getting a connection failed: nothing of the work reached a server."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(cause)
        self.cause = cause


@dataclass(slots=True)
class Result:
    """What one statement of a `Transaction.run` did: the rows it changed (or
    matched, for a SELECT: the number of rows), and the rows a SELECT returned."""

    rowcount: int
    rows: list[tuple[Any, ...]] = field(default_factory=list)


class Transaction:
    """One transaction on one connection, open from its first `run` to the COMMIT
    that `MySQLPool.transact` sends on its own when the function returns.

    How the statements travel, and why. A Galera node can abort a transaction
    (a replicated write needs its locks: a "brute-force abort") *between* two
    statements of one multi-statement packet; the server then runs the rest of the
    packet in autocommit mode, and reports OK. Measured on a 3-node cluster
    (tests/galera): with ``UPDATE ...; COMMIT`` in one packet the client saw OK for
    transactions that had been rolled back (the later statements committed alone:
    partial transactions); with each statement in a round trip of its own, none,
    because a new packet is where the server reports the abort (1213). So on a
    server that runs wsrep (`split`), the first `run` sends ``START TRANSACTION;
    <first statement>`` in one packet (START TRANSACTION takes no lock) and every
    further statement alone; elsewhere (one server: InnoDB aborts only a statement
    that waits, with an error) each `run` is one packet. COMMIT is always alone.
    """

    __slots__ = ("_conn", "_packed", "_split", "started")

    def __init__(self, conn: Any, split: bool, packed: bool = True) -> None:
        """`packed`: the connection allows several statements per packet (a pool
        made with multi_statements); without it every statement goes alone."""
        self._conn = conn
        self._split = split or not packed
        self._packed = packed
        self.started = False

    async def run(self, statements: Sequence[Statement], *, last: bool = False) -> list[Result]:
        """Run `statements` in the transaction (START TRANSACTION goes with the
        first); one `Result` per statement, in order. A driver error propagates:
        the transaction is lost, `transact` closes the connection and retries.
        `last`: nothing follows: on one server (not `split`) the COMMIT rides in
        the same packet (InnoDB reports a failed COMMIT there; a Galera node may not,
        so there it still goes alone)."""
        if not statements:
            return []
        async with self._conn.cursor() as cur:
            sqls = [s if isinstance(s, str) else cur.mogrify(s[0], s[1]) for s in statements]
            commit = last and not self._split and self.started
            if commit:
                sqls.append("COMMIT")
            out: list[Result] = []
            groups = [[sql] for sql in sqls] if self._split else [sqls]
            if not self.started and not self._packed:
                await cur.execute("START TRANSACTION")
                self.started = True
            for group in groups:
                head = not self.started
                if head:
                    group = ["START TRANSACTION", *group]
                    self.started = True
                await cur.execute("; ".join(group))
                results = [await _result(cur)]
                while await cur.nextset():
                    results.append(await _result(cur))
                out += results[1:] if head else results
            if commit:
                self.started = False  # committed: `commit()` has nothing left to send
                out.pop()
            return out

    async def commit(self) -> None:
        if self.started:
            async with self._conn.cursor() as cur:
                await cur.execute("COMMIT")
            self.started = False


async def _result(cur: Any) -> Result:
    rows = list(await cur.fetchall()) if cur.description is not None else []
    return Result(int(cur.rowcount), rows)


class MySQLPool:
    def __init__(
        self, settings: QueueSettings, *, multi_statements: bool = False, split: bool | None = None
    ) -> None:
        """`multi_statements`: allow `a; b` in one round trip (the innodb claim). Safe
        because every value is escaped client-side; never enabled for user SQL.
        `split`: send each statement of a transaction in its own round trip (see
        `Transaction`); None: when the server runs Galera (wsrep_on), found at connect."""
        self.settings = settings
        self.multi_statements = multi_statements
        self.where = settings.safe_url()
        self._split_setting = split
        self.split = bool(split)
        self._pool: Any = None
        self._lock = asyncio.Lock()
        # Connections between two uses stay checked out of aiomysql's pool, in a
        # stack: its acquire and release (a lock, a scan of the free list, a task
        # per release) cost more CPU than a one-row INSERT's whole round trip. One
        # goes back to it when a task waits there, or after IDLE_KEEP seconds idle
        # (for its checks of dead and old connections).
        self._idle: list[Any] = []
        self._waiting = 0
        # One cluster's nodes (?cluster=failover): the pool uses nodes[_node] and
        # moves on when it fails. Pools of nodes left behind close as their
        # connections come back.
        self.nodes: tuple[tuple[str, int], ...] = settings.nodes or (
            (settings.host, settings.port),
        )
        self.failover = bool(settings.nodes)
        self._node = 0
        self._retired: list[Any] = []
        self.moves = 0
        self.on_move: Callable[[], None] | None = None  # called after a failover

    @property
    def node(self) -> tuple[str, int]:
        """The (host, port) this pool uses now."""
        return self.nodes[self._node]

    def _node_name(self, index: int) -> str:
        return hostport(*self.nodes[index])

    async def connect(self, deadline: float | None = None) -> None:
        """Open the pool on the current node (failover: on the first node, from the
        current one on, that answers and is ready). With a `deadline`, TimeoutError
        when it passes (waiting for another task's connect included)."""
        if deadline is None:
            await self._connect()
        else:
            async with asyncio.timeout_at(deadline):
                await self._connect(deadline)

    async def _connect(self, deadline: float | None = None) -> None:
        async with self._lock:
            if self._pool is not None:
                return
            last: BaseException | None = None
            until = deadline if deadline is not None else self._loop_time() + RETRY_WINDOW
            tried = rolled = 0
            while tried < len(self.nodes):
                try:
                    await self._open(deadline)
                    return
                except (TimeoutError, pymysql.err.MySQLError, OSError) as exc:
                    code = _code(exc)
                    if code in _ROLLED_BACK or (code in _NOT_READY and not self.failover):
                        # the first statement of the connection was rolled back (a
                        # Galera node's aborted cached thread), or the node is not
                        # ready yet: transient, as in `run`
                        rolled += 1
                        pause = random.uniform(0.0, min(0.05, 0.001 * 2 ** min(rolled, 6)))
                        if self._loop_time() + pause < until:
                            log.info("%s on %s; connecting again", exc.args[1], self.where)
                            await asyncio.sleep(pause)
                            continue
                    if not self.failover or code in _ACCESS or code in _NO_TABLE:
                        raise translate(exc, self.where) from None
                    last = exc
                    tried += 1
                    self._move_locked(self._node, exc)
            assert last is not None
            raise translate(last, self.where) from None

    async def _open(self, deadline: float | None) -> None:
        s = self.settings
        host, port = self.node
        timeout = s.connect_timeout
        if deadline is not None:
            timeout = max(0.001, min(timeout, deadline - self._loop_time()))
        pool = await aiomysql.create_pool(
            host=host, port=port, user=s.user, password=s.password,
            db=s.database, autocommit=True, minsize=0, maxsize=s.pool_size,
            charset="utf8mb4", connect_timeout=s.connect_timeout,
            init_command="SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
            pool_recycle=3600,
            client_flag=CLIENT.MULTI_STATEMENTS if self.multi_statements else 0,
        )  # fmt: skip
        try:
            async with asyncio.timeout(timeout):
                conn = await pool.acquire()  # fail fast on bad credentials
            try:
                async with asyncio.timeout(timeout), conn.cursor() as cur:
                    await cur.execute("SHOW GLOBAL VARIABLES LIKE 'wsrep_on'")
                    row = await cur.fetchone()
                    galera = row is not None and str(row[1]).upper() == "ON"
                    if self.failover and galera:
                        await _check_ready(cur)
                    conn._mvalve_ready = True
            except BaseException:
                conn.close()
                raise
            finally:
                pool.release(conn)
        except BaseException:
            pool.close()
            raise
        self.split = galera if self._split_setting is None else self._split_setting
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        retired, self._retired = self._retired, []
        if pool is not None:
            for conn in self._idle:
                pool.release(conn)
            self._idle.clear()
        for p in [*retired, pool]:
            if p is not None:
                p.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(p.wait_closed(), 5)

    def _move(self, index: int, why: BaseException) -> None:
        """Node `index` failed: use the next one (unless another task moved already)."""
        if self.failover and index == self._node and len(self.nodes) > 1:
            self._move_locked(index, why)

    def _move_locked(self, index: int, why: BaseException) -> None:
        nxt = (index + 1) % len(self.nodes)
        code = _code(why)
        reason = f"{type(why).__name__} {code}" if code else type(why).__name__
        log.warning(
            "%s: node %s failed (%s); moving to %s",
            self.where, self._node_name(index), reason, self._node_name(nxt),
        )  # fmt: skip
        self._node = nxt
        self.moves += 1
        if self.on_move is not None:  # e.g. the queue's clock: another server's
            self.on_move()
        old, self._pool = self._pool, None
        if old is not None:
            for conn in self._idle:
                conn.close()
                old.release(conn)
            self._idle.clear()
            old.close()  # its connections in use are closed when they come back
            if old.size:
                self._retired.append(old)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A pooled connection; closed instead of released if anything went wrong."""
        try:
            conn = await self._acquire(None)
        except _NotSent as exc:
            raise translate(exc.cause, self.where) from None
        try:
            yield conn
        except BaseException:
            conn.close()
            raise
        finally:
            self._release(conn)

    async def _acquire(self, deadline: float | None) -> Any:
        """A connection to the current node; `_NotSent` when none can be had."""
        if self._pool is None:
            try:
                await self.connect(deadline)
            except (QueueError, TimeoutError) as exc:
                raise _NotSent(exc) from None
        while self._idle:  # the most recently used first: its socket is warm
            conn = self._idle.pop()
            if self._loop_time() - conn.last_usage < IDLE_KEEP and not (
                conn.closed or conn._reader.at_eof() or conn._reader.exception()
            ):
                return conn
            self._pool.release(conn)  # aiomysql drops or recycles it
        pool = self._pool
        index = self._node
        self._waiting += 1
        try:
            when = self._loop_time() + self.settings.connect_timeout
            if deadline is not None:
                when = min(when, deadline)
            if pool.freesize:  # an idle connection: no wait, no timer needed
                conn = await pool.acquire()
            else:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a
                # cancellation.
                async with asyncio.timeout_at(when):
                    conn = await pool.acquire()
            # our mark on the driver's connection object: its node was found Synced
            if self.failover and not getattr(conn, "_mvalve_ready", False):
                try:  # a new connection: is its node Synced?
                    async with asyncio.timeout_at(when), conn.cursor() as cur:
                        await _check_ready(cur)
                    conn._mvalve_ready = True
                except BaseException:
                    conn.close()
                    pool.release(conn)
                    raise
            return conn
        except (TimeoutError, pymysql.err.MySQLError, OSError) as exc:
            if _lost(exc) or _code(exc) in _NOT_READY:
                self._move(index, exc)
            raise _NotSent(exc) from None
        finally:
            self._waiting -= 1

    def _release(self, conn: Any) -> None:
        pool = self._pool
        if self._retired and (pool is None or conn not in pool._used):
            for old in self._retired:
                if conn in old._used:  # from a node left behind
                    conn.close()
                    old.release(conn)
                    if not old.size:
                        self._retired.remove(old)
                    return
        if pool is None:
            conn.close()
        elif conn.closed or self._waiting:  # someone waits in aiomysql's acquire
            pool.release(conn)
        else:
            self._idle.append(conn)

    @staticmethod
    def _loop_time() -> float:
        return asyncio.get_running_loop().time()

    async def run(
        self,
        fn: Callable[[Any], Awaitable[T]],
        *,
        idempotent: bool = True,
        attempts: int = 0,
        deadline: float | None = None,
    ) -> T:
        """Run `fn(conn)` and return what it returns.

        - Work the server rolled back (deadlock, lock wait timeout, Galera
          certification failure or brute-force abort: 1213/1205; node not ready:
          1047) is run again, with a small jittered back-off, until `deadline`
          (the event loop's clock, `loop.time()`), or for RETRY_WINDOW seconds
          without one; then the error is raised. `fn` must be safe to run again
          after a rollback (every statement of ours is).
        - A lost connection: `fn` runs again on another connection if it is
          `idempotent` (or the request never left), at most `attempts` times
          (default pool_size + 1); with ?cluster=failover, on the next node when
          this one cannot be reached, until the deadline.
        - With a `deadline`, no wait goes past it: getting a connection and every
          statement are cut off there (the connection is then closed, and the
          server may still finish the statement: leases expire), and
          `QueueUnavailable` is raised; cut off while retrying rolled-back work,
          the error is the last rollback's (`QueueBusy`) or not-ready answer's.
        """
        loop_time = self._loop_time
        until = deadline if deadline is not None else loop_time() + RETRY_WINDOW
        tries = attempts or self.settings.pool_size + 1
        lost = rolled = 0
        refused: BaseException | None = None  # the last rollback or not-ready answer
        while True:
            index, sent = self._node, False
            try:
                try:
                    conn = await self._acquire(deadline)
                except _NotSent as exc:
                    raise exc.cause from None
                sent = True
                try:
                    if deadline is None:
                        return await fn(conn)
                    async with asyncio.timeout_at(deadline):
                        return await fn(conn)
                except BaseException:
                    conn.close()
                    raise
                finally:
                    self._release(conn)
            except QueueError:
                raise
            except (TimeoutError, pymysql.err.MySQLError, OSError) as exc:
                code = _code(exc)
                now = loop_time()
                if isinstance(exc, TimeoutError) and deadline is not None and now >= deadline:
                    # cut off while trying again: what kept failing says more than
                    # the timeout (a node not ready, work rolled back)
                    raise translate(refused or exc, self.where) from None
                if code in _ROLLED_BACK or code in _NOT_READY:
                    if code in _NOT_READY:
                        self._move(index, exc)
                    refused = exc
                    rolled += 1
                    pause = random.uniform(0.0, min(0.05, 0.001 * 2 ** min(rolled, 6)))
                    if now + pause >= until:
                        raise translate(exc, self.where) from None
                    log.info("%s on %s; retrying", exc.args[1], self.where)
                    await asyncio.sleep(pause)  # desynchronise the contenders
                    continue
                if not _lost(exc):
                    raise translate(exc, self.where) from None
                if sent and code not in _NOT_SENT and not idempotent:
                    raise translate(exc, self.where) from None
                lost += 1
                if now >= until or (lost >= tries and not (self.failover and self._node != index)):
                    raise translate(exc, self.where) from None
                if self._node == index:
                    log.info("connection to %s lost (%s); retrying", self.where, code)

    async def transact(
        self,
        fn: Callable[[Transaction], Awaitable[T]],
        *,
        idempotent: bool = True,
        deadline: float | None = None,
    ) -> T:
        """Run `fn(tx)` in one transaction and COMMIT it in a round trip of its own;
        return what `fn` returned once the COMMIT succeeded.

        The contract, for claims and acks (innodb):
        - `fn` sends its statements with `await tx.run([...])` (one or more calls;
          the first opens the transaction). Each call returns one `Result` per
          statement (`rowcount`, and `rows` for a SELECT). On a Galera server each
          statement after the first is a round trip of its own (see
          `Transaction`); elsewhere each call is one round trip. Put the statements
          that must see each other's results in separate calls; keep statements
          few (on Galera each is a round trip).
        - What `fn` returns is only valid once this method returns: the COMMIT
          (sent alone, its answer checked) is what makes the work real. If the
          server rolls the transaction back at any point (deadlock, lock wait
          timeout, Galera certification failure or brute-force abort: 1213/1205,
          node not ready: 1047), the connection is closed and `fn` runs again
          from the start on a fresh transaction, until `deadline` (loop time;
          RETRY_WINDOW seconds without one). So `fn` must not act on its results
          outside the database (no deliveries, no store writes), and must be
          safe to run again: guard writes with lease tokens.
        - A connection lost mid-way: `fn` runs again if `idempotent` (a COMMIT
          whose answer was lost may have committed: the rows claimed then stay
          leased until their lease ends, never delivered twice at once);
          otherwise `QueueUnavailable`.
        - With a `deadline`, the call returns or raises by then
          (`QueueUnavailable`); work cut off mid-way may or may not have
          committed, so guard it as above.
        - `fn` that runs no statement sends nothing (no empty transaction).
        """

        async def work(conn: Any) -> T:
            tx = Transaction(conn, self.split, self.multi_statements)
            value = await fn(tx)
            await tx.commit()
            return value

        return await self.run(work, idempotent=idempotent, deadline=deadline)

    async def transaction(
        self, statements: Sequence[tuple[str, Any]], *, deadline: float | None = None
    ) -> list[int]:
        """The statements in one transaction (see `transact`: COMMIT alone, and on
        Galera each statement alone); the rows each changed. Retried like `run`:
        the statements must be safe to repeat (e.g. guarded by lease tokens)."""
        if not self.multi_statements:
            raise RuntimeError("transaction() needs a pool made with multi_statements=True")
        if not statements:
            return []

        async def work(tx: Transaction) -> list[int]:
            return [r.rowcount for r in await tx.run(statements)]

        return await self.transact(work, deadline=deadline)

    async def execute(
        self, sql: str, args: Any = None, *, idempotent: bool = True, deadline: float | None = None
    ) -> int:
        """One statement; the rows it changed."""

        async def run(conn: Any) -> int:
            async with conn.cursor() as cur:
                return int(await cur.execute(sql, args))

        return await self.run(run, idempotent=idempotent, deadline=deadline)

    async def fetch(
        self, sql: str, args: Any = None, *, deadline: float | None = None
    ) -> list[tuple[Any, ...]]:
        async def run(conn: Any) -> list[tuple[Any, ...]]:
            async with conn.cursor() as cur:
                await cur.execute(sql, args)
                return list(await cur.fetchall())

        return await self.run(run, deadline=deadline)

    async def insert(
        self, sql: str, rows: list[tuple[Any, ...]], *, deadline: float | None = None
    ) -> None:
        """One INSERT per batch (executemany past one row); not resent once sent
        (but resent after the server rolled it back)."""

        async def run(conn: Any) -> None:
            async with conn.cursor() as cur:
                if len(rows) == 1:
                    await cur.execute(sql, rows[0])
                else:
                    await cur.executemany(sql, rows)

        await self.run(run, idempotent=False, deadline=deadline)

    async def script(self, statements: Sequence[str]) -> None:
        """DDL, quiet about "table already exists" notes."""

        async def run(conn: Any) -> None:
            async with conn.cursor() as cur:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for statement in statements:
                        await cur.execute(statement)

        await self.run(run)


async def _check_ready(cur: Any) -> None:
    """Raise 1047 unless this Galera node is Synced and ready (a joiner, a donor
    or a node cut off from the primary component would stall or refuse work)."""
    await cur.execute(
        "SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_ready', 'wsrep_local_state')"
    )
    status = {str(k).lower(): str(v) for k, v in await cur.fetchall()}
    if status and (status.get("wsrep_ready") != "ON" or status.get("wsrep_local_state") != _SYNCED):
        raise pymysql.err.OperationalError(
            1047, f"node not ready (wsrep_local_state {status.get('wsrep_local_state')})"
        )


# -- what innodb and q4m ask of their tables alike --------------------------------


async def drop_tables(db: MySQLPool, tables: Tables) -> None:
    names = table_names(tables)
    await db.execute("DROP TABLE IF EXISTS " + ", ".join(f"`{t}`" for t in names))


async def purge_lanes(
    db: MySQLPool, tables: Tables, lane: Lane | None, destination: str | None
) -> int:
    """Delete the queued rows of `lane` (every lane: None), of one destination or all."""
    total = 0
    for row_lane, table in tables.all():
        if lane is not None and row_lane is not lane:
            continue
        if destination is None:
            total += await db.execute(f"DELETE FROM `{table}`")
        else:
            total += await db.execute(
                f"DELETE FROM `{table}` WHERE destination = %s", (destination,)
            )
    return total


async def count_dead(db: MySQLPool, dead: str, by_dest: dict[str, dict[str, int]]) -> int:
    """Dead letters in all, and per destination into `by_dest` (key "dead")."""
    total = 0
    for dest, count in await db.fetch(
        f"SELECT destination, COUNT(*) FROM `{dead}` GROUP BY destination"
    ):
        total += int(count)
        tally(by_dest, dest, "dead", int(count))
    return total


async def read_dead_letters(
    db: MySQLPool, dead: str, limit: int, *, by_id: bool
) -> list[dict[str, Any]]:
    """The first `limit` dead letters; `by_id` where the engine can sort (Q4M cannot)."""
    order = "ORDER BY id " if by_id else ""
    rows = await db.fetch(f"SELECT {DEAD_COLUMNS} FROM `{dead}` {order}LIMIT %s", (int(limit),))
    return [dead_letter(row) for row in rows]
