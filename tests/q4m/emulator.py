"""An in-memory Q4M emulator speaking the MySQL wire protocol (mysql-mimic).

It follows ``seed/Q4M.md`` and, where that is silent, the engine's source
(q4m/q4m ``src/ha_queue.cc``, ``src/queue_cond.cc``):

- ``queue_wait('t1'[, 't2:expr', ...][, timeout])``: with two or more
  arguments the last is the timeout (default 60 with one); tables are tried
  in argument order; returns the 1-based index or 0 on timeout, NULL for an
  unknown table or a bad condition. A row held by the caller is consumed
  first; the connection is in owner mode afterwards, even on timeout.
- Owner mode: ``SELECT``/``DELETE`` see only the owned row of that table
  (nothing at all after a timeout); other connections never see it.
  ``queue_end()`` deletes it (always returns 1), ``queue_abort()`` puts it
  back at its FIFO place (error outside owner mode), ``queue_rowid()`` is
  its id (error outside owner mode, NULL without a row). A connection that
  goes away (quit, EOF, reset, KILL, ``kill_all``) gives its row back.
- Waiters sleep on one ``asyncio.Condition``, notified by INSERT, abort and
  close; a wait is cancellable (KILL QUERY / KILL).
- ``queue_stats('t')``: ``name: value`` lines as the engine prints them. As
  in the engine, a wait that gets its row from one table counts a
  ``wait_timeout`` for each *other* table it named.

What it does NOT reproduce: persistence, fsync and crash recovery, speed
(a few thousand queries/s), compaction, ``queue_set_srcid`` and the
forwarding tools, real ``bytes_*`` figures (here: the sum of the stored
values' lengths), databases (``db.tbl`` is accepted, the db ignored),
collations (string comparisons are exact, i.e. binary), and SQL beyond the
subset parsed in ``sql`` (no joins, ORDER BY or expressions; WHERE is
an AND of ``column op literal``). ``COUNT(*)`` counts what SELECT returns.
Like MySQL, it notices a client that vanished *during* a queue_wait only
when the wait ends; a row handed to it meanwhile goes back
(restored_by_close). ``SELECT @@character_set_client`` says latin1 (see
``_Variables``). Each connection's affected-rows count is reported by
wrapping mysql-mimic's ``Connection.ok`` (it has no hook for that).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from mysql_mimic import MysqlServer, Session
from mysql_mimic.auth import IdentityProvider, NativePasswordAuthPlugin, User
from mysql_mimic.charset import CharacterSet
from mysql_mimic.results import AllowedResult
from mysql_mimic.variables import DEFAULT, GlobalVariables, SessionVariables

from tests.q4m import sql
from tests.q4m.store import Predicate, Row, Store, Table, execute, mysql_error, result_column


def _udf_error(func: str, msg: str) -> Exception:
    return mysql_error(f"Can't initialize function '{func}'; {func}(): {msg}", 1123)


def _as_int(value: Any) -> int:
    """MySQL's cast of a UDF argument to INT: a leading number, else 0."""
    if value is None or isinstance(value, int | float):
        return int(value or 0)
    number = re.match(r"\s*[+-]?\d+(\.\d*)?", value)
    return int(float(number.group())) if number else 0


class _Variables(SessionVariables):
    """Pins ``character_set_client`` to latin1 so mysql-mimic decodes each
    COM_QUERY byte for byte (a ``_binary'...'`` payload is not valid UTF-8);
    the charset the client asked for is kept in ``client_charset`` and used
    for ordinary string literals."""

    def __init__(self) -> None:
        super().__init__(GlobalVariables())
        self.client_charset = CharacterSet.utf8mb4
        super().set("character_set_client", "latin1")

    def set(self, name: str, value: Any, force: bool = False) -> None:
        if name.lower() == "character_set_client":
            wanted = "utf8mb4" if value is DEFAULT or value is None else str(value).lower()
            if wanted not in CharacterSet.__members__:
                raise mysql_error(f"Unknown character set: '{wanted}'", 1115)
            self.client_charset, value = CharacterSet[wanted], "latin1"
        super().set(name, value, force)


class _Q4MSession(Session):
    variables: _Variables

    def __init__(self, store: Store, sessions: set[_Q4MSession]) -> None:
        super().__init__(_Variables())
        self.store, self.sessions = store, sessions
        self.owner_mode = False
        self.owned: tuple[Table, Row] | None = None
        self.closed = asyncio.Event()
        self._affected: int | None = None

    # -- connection lifecycle
    async def init(self, connection: Any) -> None:
        await super().init(connection)
        self.sessions.add(self)
        plain_ok = connection.ok

        def ok(**kwargs: Any) -> bytes:
            if self._affected is not None:
                kwargs.setdefault("affected_rows", self._affected)
                self._affected = None
            return plain_ok(**kwargs)  # type: ignore[no-any-return]

        connection.ok = ok

    async def close(self) -> None:  # mysql-mimic calls it on quit, EOF, reset and KILL
        try:
            async with self.store.cond:
                self._give_back("restored_by_close")
        finally:
            self.sessions.discard(self)
            self.closed.set()
            await super().close()

    def kill(self) -> None:
        if self._connection is not None:
            self._connection.kill()

    async def schema(self) -> dict[str, Any]:  # SHOW TABLES, DESCRIBE, information_schema
        tables = self.store.tables.values()
        columns = {t.name: {c.name: c.sql_type for c in t.columns} for t in tables}
        return {self.database or "test": columns}

    # -- the View the table statements use
    def visible(self, table: Table) -> list[Row]:
        if self.owner_mode:
            owned = self.owned
            return (
                [owned[1]] if owned and owned[0] is table and owned[1].rowid in table.rows else []
            )
        return [row for row in table.rows.values() if row.owner is None]

    def decode(self, raw: bytes) -> str:
        try:
            return raw.decode(self.variables.client_charset.codec)
        except UnicodeDecodeError:
            raise mysql_error(f"Incorrect string value: {raw[:20]!r}", 1366) from None

    def text_charset(self) -> CharacterSet:
        results = str(self.variables.get("character_set_results") or "utf8mb4").lower()
        return CharacterSet.__members__.get(results, CharacterSet.utf8mb4)

    # -- queries
    async def handle_query(self, sql_text: str, attrs: dict[str, str]) -> AllowedResult:
        self._affected = None
        if " ".join(sql_text.split()).upper() == "SELECT UNIX_TIMESTAMP(NOW(6))":
            # the server's clock, as the library's ServerClock samples it
            now = round(time.time() + self.store.clock_offset, 6)
            return [[now]], [result_column(sql_text, "float", self)]
        try:
            stmt = sql.parse(sql_text)  # sql_text is latin1: one char per byte
            if stmt is None:  # SET NAMES, SELECT @@x, SHOW ...: mysql-mimic's own handling
                return await super().handle_query(self.decode(sql_text.encode("latin1")), attrs)
            async with self.store.cond:
                if isinstance(stmt, sql.Noop):  # transactions, SET sql_mode
                    return None
                if isinstance(stmt, sql.Select) and stmt.table is None:
                    return await self._call_functions(stmt.items)
                result, self._affected = execute(self.store, stmt, self)
                return result
        except sql.SqlError as e:
            raise mysql_error(e.msg, e.code) from None

    # -- queue functions
    async def _call_functions(self, items: list[sql.SelectItem]) -> AllowedResult:
        values, columns = [], []
        for item in items:
            values.append(await getattr(self, f"_fn_{item.name}")(item.args))
            kind = "text" if item.name == "queue_stats" else "int"
            columns.append(result_column(item.text, kind, self))
        return [values], columns

    def _text_arg(self, value: Any) -> str:
        return self.decode(value.raw) if isinstance(value, sql.Str) else str(value)

    def _erase_owned(self) -> None:
        """queue_end's work: delete the owned row, leave owner mode."""
        if self.owned is not None:
            self.owned[0].remove(self.owned[1])
        self.owned, self.owner_mode = None, False

    def _give_back(self, counter: str) -> None:
        """Return the owned row to its FIFO place and wake the waiters."""
        if self.owned is not None:
            table, row = self.owned
            if table.rows.get(row.rowid) is row:
                row.owner = None
                table.stats[counter] += 1
                self.store.cond.notify_all()
        self.owned, self.owner_mode = None, False

    def _claim(self, targets: list[tuple[Table, Predicate | None]]) -> int:
        for index, (table, test) in enumerate(targets, 1):
            for row in table.rows.values():
                if row.owner is None and (test is None or test(row.values)):
                    row.owner, self.owned = self, (table, row)
                    return index
        return 0

    async def _fn_queue_wait(self, args: list[Any]) -> int | None:
        if not args:
            raise _udf_error("queue_wait", "argument error")
        seconds = 60
        if len(args) >= 2:  # the last argument is always the timeout
            last, args = args[-1], args[:-1]
            seconds = _as_int(self._text_arg(last) if isinstance(last, sql.Str) else last)
        self._erase_owned()
        targets: list[tuple[Table, Predicate | None]] = []
        for arg in args:
            name, _, expr = self._text_arg(arg).partition(":")
            table = self.store.tables.get(name.rpartition(".")[2])
            if table is None:
                return None  # the engine logs "could not find table" and returns NULL
            try:
                targets.append((table, table.condition(expr) if expr else None))
            except sql.SqlError:
                return None
        index = self._claim(targets)
        delayed = not index and seconds > 0
        if delayed:
            try:
                async with asyncio.timeout(seconds):
                    index = await self._park(targets)
            except TimeoutError:
                index = 0
        self.owner_mode = True
        for i, (table, _) in enumerate(targets, 1):
            hit = "wait_delayed" if delayed else "wait_immediate"
            table.stats[hit if i == index else "wait_timeout"] += 1
        return index

    async def _park(self, targets: list[tuple[Table, Predicate | None]]) -> int:
        """Sleep on the store's condition until a row can be claimed."""
        store = self.store
        store.waiting += 1
        store.parked.notify_all()
        try:
            while not (index := self._claim(targets)):
                await store.cond.wait()
            return index
        finally:
            store.waiting -= 1

    async def _fn_queue_end(self, args: list[Any]) -> int:
        self._erase_owned()
        return 1

    async def _fn_queue_abort(self, args: list[Any]) -> int:
        if not self.owner_mode:
            raise _udf_error("queue_abort", "not in owner mode")
        self._give_back("restored_by_abort")
        return 1

    async def _fn_queue_rowid(self, args: list[Any]) -> int | None:
        if args:
            raise _udf_error("queue_rowid", "argument error")
        if not self.owner_mode:
            raise _udf_error("queue_rowid", "not in owner mode")
        return self.owned[1].rowid if self.owned else None

    async def _fn_queue_stats(self, args: list[Any]) -> str | None:
        if len(args) != 1:
            raise _udf_error("queue_stats", "argument error")
        table = self.store.tables.get(self._text_arg(args[0]).rpartition(".")[2])
        return None if table is None else "".join(f"{k}: {v}\n" for k, v in table.stats.items())


class _AnyPassword(NativePasswordAuthPlugin):
    def password_matches(self, user: User, scramble: bytes, nonce: bytes) -> bool:
        return True


class _Identities(IdentityProvider):
    def __init__(self, password: str | None) -> None:
        self.password = password

    def get_plugins(self) -> list[NativePasswordAuthPlugin]:
        return [_AnyPassword() if self.password is None else NativePasswordAuthPlugin()]

    async def get_user(self, username: str) -> User | None:
        auth = None
        if self.password:
            auth = NativePasswordAuthPlugin.create_auth_string(self.password)
        return User(name=username, auth_string=auth, auth_plugin=NativePasswordAuthPlugin.name)


class Q4MServer:
    """A Q4M server on a local port. ``password=None`` accepts any user and
    password; a string is then the only password accepted ("" = empty)."""

    def __init__(self, *, password: str | None = None) -> None:
        self.host = "127.0.0.1"
        self.port: int | None = None
        self._store = Store()
        self._sessions: set[_Q4MSession] = set()
        self._server: MysqlServer | None = None
        self._password = password

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0: any free port); returns the port."""
        self._server = MysqlServer(
            session_factory=lambda: _Q4MSession(self._store, self._sessions),
            identity_provider=_Identities(self._password),
        )
        await self._server.start_server(host=host, port=port)
        self.host, self.port = host, self._server.sockets()[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self.kill_all()
            await self._server.wait_closed()
            self._server = None

    async def kill_all(self) -> int:
        """Drop every client connection, as KILL does (owned rows go back);
        returns how many were dropped."""
        sessions = list(self._sessions)
        for session in sessions:
            session.kill()
        if sessions:
            async with asyncio.timeout(10):
                await asyncio.gather(*(s.closed.wait() for s in sessions))
        return len(sessions)

    async def __aenter__(self) -> Q4MServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def clock_offset(self) -> float:
        """Seconds the emulated server's clock is ahead of this host's."""
        return self._store.clock_offset

    @clock_offset.setter
    def clock_offset(self, value: float) -> None:
        self._store.clock_offset = value

    @property
    def url(self) -> str:
        return f"mysql+q4m://root@{self.host}:{self.port}/test"

    # -- introspection for tests
    @property
    def connections(self) -> int:
        return len(self._sessions)

    def rows(self, table: str) -> list[dict[str, Any]]:
        """Every row of ``table`` in FIFO order, owned or not, plus ``_rowid``
        and ``_owned``."""
        rows = self._store.table(table).rows.values()
        return [{"_rowid": r.rowid, "_owned": r.owner is not None, **r.values} for r in rows]

    def stats(self, table: str) -> dict[str, int]:
        return dict(self._store.table(table).stats)

    async def wait_for_waiters(self, count: int) -> None:
        """Return once ``count`` connections are blocked in queue_wait (for
        tests that must act only after a waiter is parked)."""
        store = self._store
        async with store.parked:
            await store.parked.wait_for(lambda: store.waiting >= count)
