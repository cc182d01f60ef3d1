from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from mvalve_async.interfaces import Queue
from mvalve_async.registry import make_queue
from mvalve_async.urls import QueueSettings, Tables
from tests import ci_skips
from tests.ci_skips import (  # noqa: F401  (hooks: in CI a skip fails)
    pytest_runtest_makereport,
    pytest_sessionfinish,
)
from tests.q4m.fixtures import q4m_server  # noqa: F401  (a fixture the q4m params use)
from tests.services import MYSQL_URL, require_mysql

DIALECTS = ["memory", "innodb", "sqlite", "q4m", "sharded"]


def unique_tables(prefix: str = "t") -> Tables:
    sfx = f"{prefix}{uuid.uuid4().hex[:8]}"
    return Tables(
        emergency=(f"e_{sfx}",), timed=(f"t_{sfx}",), normal=(f"n_{sfx}",), dead=f"d_{sfx}"
    )


def _available(dialect: str) -> bool:
    module = {"sqlite": "mvalve_async.queues.sqlite", "q4m": "mvalve_async.queues.q4m"}.get(dialect)
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


async def open_queue(dialect: str, tmp_path: object, request: pytest.FixtureRequest) -> Queue:
    tables = unique_tables()
    if dialect == "memory":
        settings = QueueSettings("memory", tables=tables)
    elif dialect == "innodb":
        require_mysql()
        settings = QueueSettings.from_url(MYSQL_URL)
        settings = QueueSettings(
            "innodb", host=settings.host, port=settings.port, user=settings.user,
            password=settings.password, database=settings.database, tables=tables,
        )  # fmt: skip
    elif dialect == "sqlite":
        settings = QueueSettings("sqlite", path=os.path.join(str(tmp_path), "q.db"), tables=tables)
    elif dialect == "q4m":
        server = request.getfixturevalue("q4m_server")
        settings = QueueSettings("q4m", port=server.port, tables=tables, database="test")
    elif dialect == "sharded":
        return await open_sharded_queue()
    else:  # pragma: no cover
        raise AssertionError(dialect)
    queue = make_queue(settings)
    await queue.connect()
    await queue.create_schema()
    return queue


@pytest.fixture
def _q4m_ready(request: pytest.FixtureRequest) -> None:
    """Starts `q4m_server` ahead of the async `queue`/`pipe` fixtures when their param
    is q4m: pytest-asyncio cannot set up an async fixture from inside another one
    (`request.getfixturevalue` there raises "Runner.run() cannot be called from a
    running event loop"); once set up, open_queue's getfixturevalue returns it."""
    callspec = getattr(request.node, "callspec", None)
    params = callspec.params if callspec is not None else {}
    if "q4m" in (params.get("queue"), params.get("pipe")):
        request.getfixturevalue("q4m_server")


async def open_sharded_queue(shards: int = 2) -> Queue:
    """A ShardedQueue of `shards` innodb queues on the main MariaDB, each with its own
    table set: "servers" simulated by table sets (the ring keys are fixed, `shard<i>`,
    so placement is the same on every run). tests/faults/test_shards.py uses real
    separate servers."""
    from mvalve_async.queues.sharded import ShardedQueue

    require_mysql()
    base = QueueSettings.from_url(MYSQL_URL)
    children = [make_queue(replace(base, tables=unique_tables(f"s{i}"))) for i in range(shards)]
    queue = ShardedQueue(children, keys=[f"shard{i}" for i in range(shards)])
    await queue.connect()
    await queue.create_schema()
    return queue


@pytest.fixture(params=DIALECTS)
async def queue(
    request: pytest.FixtureRequest, tmp_path: object, _q4m_ready: None
) -> AsyncIterator[Queue]:
    """A connected queue with fresh tables, for every dialect the tree has."""
    if not _available(request.param):
        pytest.skip(f"dialect {request.param} is not built yet")
    q = await open_queue(request.param, tmp_path, request)
    try:
        yield q
    finally:
        await q.drop_schema()
        await q.close()


@pytest.fixture(params=[d for d in DIALECTS if d != "q4m"] + ["q4m"])
async def pipe(
    request: pytest.FixtureRequest, tmp_path: object, _q4m_ready: None
) -> AsyncIterator[object]:
    """A connected Pipe (queue of every dialect, memory store) on fresh tables."""
    from mvalve_async.pipe import Pipe
    from mvalve_async.stores.memory import MemoryStore

    if not _available(request.param):
        pytest.skip(f"dialect {request.param} is not built yet")
    q = await open_queue(request.param, tmp_path, request)
    p = Pipe(q, MemoryStore())
    await p.connect()
    try:
        yield p
    finally:
        await p.close()
        await q.connect()
        await q.drop_schema()
        await q.close()


def pytest_terminal_summary(terminalreporter: object, config: pytest.Config) -> None:
    """The fault suite's ledger lines (lost/unexpected/duplicated/exceedances), and
    in CI the tests that skipped."""
    from tests.ledger import LINES

    if LINES:
        terminalreporter.section("ledger checker")  # type: ignore[attr-defined]
        for line in LINES:
            terminalreporter.write_line(line)  # type: ignore[attr-defined]
    ci_skips.pytest_terminal_summary(terminalreporter, config)
