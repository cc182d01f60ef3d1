"""The statements innodb and sqlite share (queues/_sql.py) over lanes of several
tables: the next due time and the emergency fact of `scan` and `stats`, the counts,
the dead-letter copy. The memory dialect is the reference."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from mvalve_async.interfaces import Lane, Row, Want
from mvalve_async.registry import make_queue
from mvalve_async.urls import QueueSettings, Tables
from tests.services import MYSQL_URL, require_mysql


def _tables() -> Tables:
    sfx = uuid.uuid4().hex[:8]
    return Tables(
        emergency=(f"e1_{sfx}", f"e2_{sfx}"), timed=(f"t1_{sfx}", f"t2_{sfx}"),
        normal=(f"n_{sfx}",), dead=f"d_{sfx}",
    )  # fmt: skip


def _settings(dialect: str, tmp_path: Path) -> QueueSettings:
    tables = _tables()
    if dialect == "sqlite":
        return QueueSettings("sqlite", path=os.path.join(tmp_path, "q.db"), tables=tables)
    if dialect == "innodb":
        require_mysql()
        base = QueueSettings.from_url(MYSQL_URL)
        return QueueSettings(
            "innodb", host=base.host, port=base.port, user=base.user,
            password=base.password, database=base.database, tables=tables,
        )  # fmt: skip
    return QueueSettings("memory", tables=tables)


@pytest.mark.parametrize("dialect", ["memory", "sqlite", "innodb"])
async def test_several_tables_per_lane_one_of_them_empty(dialect: str, tmp_path: Path) -> None:
    queue = make_queue(_settings(dialect, tmp_path))
    await queue.connect()
    await queue.create_schema()
    try:
        now = time.time()
        # one row each: the other table of the lane stays empty
        await queue.insert(Lane.TIMED, [Row("d", b"later", now + 60)])
        await queue.insert(Lane.EMERGENCY, [Row("e", b"now")])
        await queue.insert(Lane.NORMAL, [Row("d", b"n")])
        scan = await queue.scan(now)
        stats = await queue.stats(now)
        assert scan.emergency
        assert scan.next_due == pytest.approx(now + 60, abs=1e-5)
        assert stats.next_due == pytest.approx(now + 60, abs=1e-5)
        assert stats.queued == {Lane.EMERGENCY: 1, Lane.TIMED: 1, Lane.NORMAL: 1}

        (emergency,) = await queue.claim([], now, 30.0, emergency=5)
        (normal,) = await queue.claim([Want("d", 5)], now, 30.0)
        stats = await queue.stats(now)
        assert stats.leased == {Lane.EMERGENCY: 1, Lane.TIMED: 0, Lane.NORMAL: 1}
        assert not (await queue.scan(now)).emergency
        await queue.dead([emergency], "test")
        stats = await queue.stats(now)
        assert stats.dead == 1 and stats.by_destination["e"] == {"dead": 1}
        assert stats.by_destination["d"]["leased"] == 1
        (dead,) = await queue.dead_letters()
        assert (dead["lane"], dead["destination"], dead["reason"]) == ("emergency", "e", "test")
        await queue.ack([normal])
    finally:
        await queue.drop_schema()
        await queue.close()
