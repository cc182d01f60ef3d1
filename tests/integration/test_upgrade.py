"""An upgrade with a backlog loses nothing (issue 14): tables made by 0.1, rows it
moved to the timed lane as reserved, and its store records (version 3) drain
through this version's readers, within the rate and in order."""

from __future__ import annotations

import os
import uuid
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from mvalve_async import Message, Pipe, Rate
from mvalve_async.message import encode
from mvalve_async.registry import make_queue
from mvalve_async.stores.memory import MemoryStore
from mvalve_async.throttle import key_for
from mvalve_async.urls import QueueSettings
from tests.conftest import unique_tables
from tests.ledger import max_in_window
from tests.services import MYSQL_URL, require_mysql

# The timed lane of 0.1: a `reserved` column, KEY ready and KEY destination.
OLD_TIMED = {
    "innodb": (
        "CREATE TABLE `{t}` (id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT, destination "
        "VARCHAR(255) NOT NULL, ready BIGINT NOT NULL, reserved TINYINT NOT NULL DEFAULT 0, "
        "message MEDIUMBLOB NOT NULL, created BIGINT NOT NULL, lease_until BIGINT NOT NULL "
        "DEFAULT 0, lease_token BIGINT NOT NULL DEFAULT 0, deliveries INT NOT NULL DEFAULT 0, "
        "PRIMARY KEY (id), KEY ready (ready, created), KEY destination (destination)) "
        "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
    ),
    "sqlite": (
        "CREATE TABLE {t} (id INTEGER PRIMARY KEY AUTOINCREMENT, destination TEXT NOT NULL, "
        "ready INTEGER NOT NULL, reserved INTEGER NOT NULL DEFAULT 0, message BLOB NOT NULL, "
        "created INTEGER NOT NULL, lease_until INTEGER NOT NULL DEFAULT 0, lease_token "
        "INTEGER NOT NULL DEFAULT 0, deliveries INTEGER NOT NULL DEFAULT 0)"
    ),
}


@pytest.mark.parametrize("dialect", ["innodb", "sqlite"])
async def test_a_backlog_moved_by_0_1_drains_in_order_within_the_rate(
    dialect: str, tmp_path: Path
) -> None:
    tables = unique_tables("up")
    if dialect == "innodb":
        require_mysql()
        settings = replace(QueueSettings.from_url(MYSQL_URL), tables=tables)
    else:
        settings = QueueSettings("sqlite", path=os.path.join(tmp_path, "q.db"), tables=tables)
    queue = make_queue(settings)
    await queue.connect()
    timed = tables.timed[0]
    sql = OLD_TIMED[dialect].format(t=timed)
    if dialect == "innodb":
        await queue.db.execute(sql)  # type: ignore[attr-defined]
    else:
        await queue._conn.run([(sql, ())])  # type: ignore[attr-defined]
    await queue.create_schema()  # the other tables; the old timed one is kept
    store = MemoryStore()
    pipe = Pipe(queue, store)
    await pipe.connect()
    try:
        now = round(queue.clock.now(), 6)  # 0.1's records kept microseconds too
        created = int(now * 1e6)
        # 0.1 moved messages 0-5 to the timed lane with their slots reserved, a
        # window apart in threes; 6-8 were still in the normal lane behind them
        dest = f"sms-{uuid.uuid4().hex[:6]}"
        insert = (
            f"INSERT INTO {'`' + timed + '`' if dialect == 'innodb' else timed} "
            "(destination, ready, reserved, message, created, deliveries) VALUES "
            + ("(%s, %s, 1, %s, %s, 0)" if dialect == "innodb" else "(?, ?, 1, ?, ?, 0)")
        )  # fmt: skip
        for i in range(6):
            args = (dest, int((now - 1 + 0.5 * (i // 3)) * 1e6), encode(Message(dest, i)),
                    created + i)  # fmt: skip
            if dialect == "innodb":
                await queue.db.execute(insert, args)  # type: ignore[attr-defined]
            else:
                await queue._conn.run([(insert, args)])  # type: ignore[attr-defined]
        await pipe.writer().insert_many([Message(dest, i) for i in range(6, 9)])
        # and 0.1's record (version 3): three hand-outs a moment ago, slots reserved
        sent = [round(now - 0.3, 6), round(now - 0.2, 6), round(now - 0.1, 6)]
        old = [3, [now + 1.0], sent, 0.0, 0.0, 0.0, 0.0, now + 1.0, [[now + 1.0, created]], []]
        await store.update(key_for(dest), lambda _raw: (orjson.dumps(old), None))
        reader = pipe.reader(rate=Rate(3, per=0.5))
        got = []
        while (msg := await reader.next(timeout=2)) is not None:
            got.append(msg)
        await reader.close()
        assert [m.content for m in got] == list(range(9))  # none lost, none twice, in order
        assert [m.lane for m in got] == ["timed"] * 6 + ["normal"] * 3
        stamps = [m.delivered_at for m in got if m.delivered_at is not None]
        # 0.1's last three hand-outs (now - 0.3 ...) count: the first new one waits
        assert max_in_window([*sent, *stamps], 0.5, 1e-6) <= 3
        assert all(m.deliveries == 1 for m in got)
        stats = await queue.stats(queue.clock.now())
        assert sum(stats.queued.values()) + sum(stats.leased.values()) == 0 and stats.dead == 0
    finally:
        await pipe.close()
        await queue.connect()
        await queue.drop_schema()
        await queue.close()
