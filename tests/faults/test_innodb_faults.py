"""Faults on the innodb dialect, each checked by the ledger (tests/ledger.py)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import aiomysql
import pytest

import mvalve_async
from mvalve_async import Message, QueueUnavailable
from mvalve_async.interfaces import Lane, Row
from tests.conftest import unique_tables
from tests.ledger import Ledger
from tests.mariadb_proc import MariaDBProcess
from tests.services import MYSQL_URL, require_mysql

ROOT = Path(__file__).resolve().parents[2]


def with_tables(url: str, prefix: str = "f") -> str:
    t = unique_tables(prefix)
    return f"{url}?emergency={t.emergency[0]}&timed={t.timed[0]}&normal={t.normal[0]}&dead={t.dead}"


async def drain(pipe: mvalve_async.Pipe, ledger: Ledger, idle: float = 1.0) -> None:
    async with pipe.reader(lease=5.0) as reader:
        while (msg := await reader.next(timeout=idle)) is not None:
            ledger.delivered(msg)


def pool_thread_ids(pipe: mvalve_async.Pipe) -> list[int]:
    pool: Any = pipe.queue.db._pool  # type: ignore[attr-defined]
    if pool is None:
        return []
    conns = list(pool._free) + list(pool._used)
    return [c.server_thread_id[0] for c in conns if not c.closed and c.server_thread_id]


async def test_server_killed_during_write_burst(private_mariadb: MariaDBProcess) -> None:
    url = with_tables(private_mariadb.url)
    ledger, failures = Ledger(), 0
    async with mvalve_async.open(url, "memory://", create=True) as pipe:
        writer = pipe.writer()
        half = asyncio.Event()

        async def write() -> None:
            nonlocal failures
            i = 0
            while len(ledger.acknowledged) < 800:
                msg = Message(f"d{i % 5}", i)
                i += 1
                ledger.attempt(msg)
                try:
                    await writer.insert(msg)
                    ledger.acked(msg)
                except QueueUnavailable:
                    failures += 1
                    await asyncio.sleep(0.02)
                if len(ledger.acknowledged) == 300:
                    half.set()

        async def chaos() -> None:
            await half.wait()
            await asyncio.to_thread(private_mariadb.kill)
            await asyncio.sleep(0.3)
            await asyncio.to_thread(private_mariadb.start)

        await asyncio.gather(write(), chaos())
        await drain(pipe, ledger)
    report = ledger.check()
    print("\n" + report.line("mariadbd kill -9 during a write burst"), f"failed inserts {failures}")
    assert failures > 0  # the fault did happen
    assert report.lost == 0 and report.unexpected == 0 and report.duplicated == 0
    assert report.acknowledged == 800


async def test_connections_killed_during_claims_and_acks() -> None:
    require_mysql()
    url = with_tables(MYSQL_URL)
    ledger, kills = Ledger(), 0
    async with mvalve_async.open(url, "memory://", create=True) as pipe:
        batch = [Message(f"d{i % 7}", i) for i in range(600)]
        for m in batch:
            ledger.attempt(m)
        await pipe.writer().insert_many(batch)
        for m in batch:
            ledger.acked(m)
        admin = await aiomysql.connect(host="127.0.0.1", user="root", db="test", autocommit=True)
        done = asyncio.Event()

        async def consume() -> None:
            async with pipe.reader(lease=1.0, batch=8) as reader:
                while (msg := await reader.next(timeout=2.0)) is not None:
                    ledger.delivered(msg)
            done.set()

        async def killer() -> None:
            nonlocal kills
            rng = random.Random(7)
            while not done.is_set():
                ids = pool_thread_ids(pipe)
                if ids:
                    async with admin.cursor() as cur:
                        try:
                            await cur.execute(f"KILL CONNECTION {rng.choice(ids)}")
                            kills += 1
                        except aiomysql.Error:
                            pass  # it had just closed
                await asyncio.sleep(rng.uniform(0.005, 0.03))

        await asyncio.gather(consume(), killer())
        await drain(pipe, ledger)
        admin.close()
        await pipe.queue.drop_schema()
    report = ledger.check()
    print("\n" + report.line("KILL CONNECTION during claims and acks"), f"kills {kills}")
    assert kills > 10
    assert report.lost == 0 and report.unexpected == 0
    assert report.delivered == 600


READER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, mvalve_async

    async def main(url):
        async with mvalve_async.open(url, "memory://") as pipe:
            reader = pipe.reader(lease=1.5, batch=8)
            for _ in range(20):
                msg = await reader.next(timeout=10)
                print(msg.id, flush=True)
            await asyncio.Event().wait()  # holds its leases until killed

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_reader_process_kill9_while_holding_leases(tmp_path: Path) -> None:
    require_mysql()
    url = with_tables(MYSQL_URL)
    ledger = Ledger()
    async with mvalve_async.open(url, "memory://", create=True) as pipe:
        batch = [Message("d", i) for i in range(100)]
        for m in batch:
            ledger.attempt(m)
        await pipe.writer().insert_many(batch)
        for m in batch:
            ledger.acked(m)
        script = tmp_path / "reader.py"
        script.write_text(READER_SCRIPT)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), url, stdout=subprocess.PIPE, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert proc.stdout is not None
        seen = [(await proc.stdout.readline()).decode().strip() for _ in range(20)]
        assert all(seen)
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
        for mid in seen:
            ledger.deliveries[mid] += 1
        t0 = time.monotonic()
        await drain(pipe, ledger, idle=3.0)
        waited = time.monotonic() - t0
        await pipe.queue.drop_schema()
    report = ledger.check()
    print("\n" + report.line("reader process kill -9 holding leases"))
    assert report.lost == 0 and report.unexpected == 0
    assert report.delivered == 100
    assert report.duplicated <= 20 + 8  # only what the killed reader had handed out or held
    assert waited >= 1.0  # its leases had to expire first


async def test_impossible_destination_row_goes_to_dead_letters() -> None:
    require_mysql()
    url = with_tables(MYSQL_URL)
    async with mvalve_async.open(url, "memory://", create=True) as pipe:
        from mvalve_async.message import encode

        long_dest = "x" * 200  # over the 40-character limit, written behind our back
        blob = encode(Message("ok", "fine"))
        await pipe.queue.insert(Lane.NORMAL, [Row(long_dest, blob), Row("", blob)])
        await pipe.writer().insert(Message("ok", "after"))
        async with pipe.reader() as reader:
            msg = await reader.next(timeout=5)
            assert msg is not None and msg.content == "after"
            assert await reader.next(timeout=0.5) is None  # the bad rows are read too
        reasons = sorted(d["reason"] for d in await pipe.queue.dead_letters())
        assert len(reasons) == 2 and all(r.startswith("unreadable") for r in reasons)
        await pipe.queue.drop_schema()


async def test_least_privilege_user_reads_and_writes_but_cannot_create() -> None:
    require_mysql()
    tables = unique_tables("lp")
    url = (
        f"{MYSQL_URL}?emergency={tables.emergency[0]}&timed={tables.timed[0]}"
        f"&normal={tables.normal[0]}&dead={tables.dead}"
    )
    async with mvalve_async.open(url, "memory://", create=True) as admin_pipe:
        admin: Any = await aiomysql.connect(host="127.0.0.1", user="root", autocommit=True)
        async with admin.cursor() as cur:
            await cur.execute("DROP USER IF EXISTS 'mvalve_rw'@'127.0.0.1'")
            await cur.execute("CREATE USER 'mvalve_rw'@'127.0.0.1' IDENTIFIED BY 'Rw-s3cret-pw'")
            for name in [*(n for _, n in tables.all()), tables.dead]:
                await cur.execute(
                    f"GRANT SELECT, INSERT, UPDATE, DELETE ON test.`{name}` TO "
                    "'mvalve_rw'@'127.0.0.1'"
                )
        try:
            rw_url = url.replace("root@", "mvalve_rw:Rw-s3cret-pw@")
            async with mvalve_async.open(rw_url, "memory://") as pipe:
                await pipe.writer().insert(Message("d", "least privilege"))
                async with pipe.reader() as reader:
                    msg = await reader.next(timeout=5)
                    assert msg is not None and msg.content == "least privilege"
                    await reader.reject(msg, "testing dead letters")
                assert len(await pipe.queue.dead_letters()) == 1
                with pytest.raises(mvalve_async.QueueError) as info:
                    await pipe.queue.create_schema()
                assert "Rw-s3cret-pw" not in str(info.value)
                assert "Rw-s3cret-pw" not in repr(pipe)
        finally:
            async with admin.cursor() as cur:
                await cur.execute("DROP USER IF EXISTS 'mvalve_rw'@'127.0.0.1'")
            admin.close()
            await admin_pipe.queue.drop_schema()


async def test_password_never_in_errors_reprs_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    require_mysql()
    caplog.set_level("DEBUG")
    secret = "Wr0ng-pass-XYZ"
    url = f"mysql+innodb://root:{secret}@127.0.0.1:3306/test"
    pipe = mvalve_async.open(url, "memory://")
    assert secret not in repr(pipe) and secret not in repr(pipe.queue)
    with pytest.raises(QueueUnavailable) as info:
        await pipe.connect()
    text = f"{info.value!s} {info.value!r} {info.value.__cause__!r} {info.value.__context__!r}"
    assert "access denied" in str(info.value).lower()
    assert secret not in text
    assert all(secret not in r.getMessage() for r in caplog.records)
    await pipe.close()
