"""The examples run as a user runs them: as scripts, in a fresh directory.

quickstart on the embedded SQLite default; the worker (SIGTERM after some
deliveries: exit 0, every message acknowledged or back in the queue) and the
web service (POST then GET /stats) on the SQLite default and on MariaDB.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import mvalve_async
from mvalve_async import Lane, Message
from mvalve_async.message import decode
from tests.services import MYSQL_URL, require_mysql

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def script_env(**extra: str) -> dict[str, str]:
    """The caller's environment, the checkout importable, no inherited backend URLs."""
    env = {k: v for k, v in os.environ.items() if k not in ("MVALVE_URL", "MVALVE_STORE_URL")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return {**env, **extra}


async def run(*argv: str, cwd: Path, env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode()


class Backend:
    """Where a script's queue lives: `url` for the test, `env` for the script."""

    def __init__(self, url: str, env: dict[str, str]) -> None:
        self.url, self.env = url, env


@pytest.fixture(params=["sqlite-default", "mariadb"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite-default":
        # No MVALVE_URL: the script uses mvalve.sqlite3 in its working directory.
        yield Backend(f"sqlite:///{tmp_path / 'mvalve.sqlite3'}", script_env())
        return
    require_mysql()
    sfx = uuid.uuid4().hex[:8]
    url = f"{MYSQL_URL}?emergency=e_x{sfx}&timed=t_x{sfx}&normal=n_x{sfx}&dead=d_x{sfx}"
    status, out = await run(
        sys.executable, "-m", "mvalve_async.cli", "--url", url, "create",
        cwd=tmp_path, env=script_env(),
    )  # fmt: skip
    assert status == 0, out
    try:
        yield Backend(url, script_env(MVALVE_URL=url))
    finally:
        async with mvalve_async.open(url, "memory://", create=False) as pipe:
            await pipe.queue.drop_schema()


async def queued_ids(url: str) -> tuple[set[str], Any]:
    async with mvalve_async.open(url, "memory://", create=False) as pipe:
        stats = await pipe.queue.stats(time.time())
        rows = await pipe.queue.peek(10_000)
    return {decode(row["blob"]).id for row in rows}, stats


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- quickstart -------------------------------------------------------------------


async def test_quickstart_runs_on_the_embedded_default(tmp_path: Path) -> None:
    status, out = await run(
        sys.executable, str(EXAMPLES / "quickstart.py"), cwd=tmp_path, env=script_env()
    )
    assert status == 0, out
    lines = out.splitlines()
    assert len(lines) == 21, out
    assert "emergency" in lines[0]  # the emergency lane first
    times = [float(line.split("s", 1)[0]) for line in lines]
    # 5/s per destination: the emergency, then 4 more of carrier-0 (the emergency
    # counts in its window) and 5 of carrier-1 at once; the rest a second later
    assert sum(t < 0.5 for t in times) == 10 and times[-1] >= 1.0
    assert (tmp_path / "quickstart.sqlite3").exists()


# -- worker -----------------------------------------------------------------------


async def test_worker_stops_on_sigterm_and_loses_nothing(backend: Backend, tmp_path: Path) -> None:
    async with mvalve_async.open(backend.url, "memory://", create=True) as pipe:
        sent = [Message(f"partner-{i % 3}", {"n": i}) for i in range(60)]
        await pipe.writer().insert_many(sent)
    ids = {m.id for m in sent}

    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / "worker.py"), cwd=tmp_path, env=backend.env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(60):
            # The upstream takes 4/s per destination, the valve gives 5/s: 429s come
            # within the first second.
            while sum(ln.startswith("delivered") for ln in lines) < 12 or not any(
                ln.startswith("429") for ln in lines
            ):
                line = await proc.stdout.readline()
                assert line, "the worker exited early: " + (await proc.stderr.read()).decode()
                lines.append(line.decode().rstrip("\n"))
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            rest, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines += rest.decode().splitlines()
    assert proc.returncode == 0, "\n".join(lines) + err.decode()
    assert lines[-1].startswith("stopped after")

    delivered = [ln.split()[1] for ln in lines if ln.startswith("delivered")]
    assert len(delivered) == len(set(delivered))  # none twice
    assert set(delivered) <= ids
    remaining, stats = await queued_ids(backend.url)
    # the worker returned what it held
    assert sum(stats.leased.values()) == 0, "\n".join(lines) + err.decode()
    assert stats.dead == 0
    assert not remaining & set(delivered)  # delivered ones were acknowledged
    assert remaining | set(delivered) == ids  # the rest is back in the queue
    assert remaining  # SIGTERM came before the worker drained the queue


# -- web service ------------------------------------------------------------------


def http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_web_service_accepts_messages_and_reports_stats(
    backend: Backend, tmp_path: Path
) -> None:
    pytest.importorskip("aiohttp")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / "web_service.py"), "--port", str(port),
        cwd=tmp_path, env=backend.env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(30):  # the service says when it listens
            while not lines or not lines[-1].startswith("listening on "):
                line = await proc.stdout.readline()
                assert line, "the service exited early: " + "\n".join(lines)
                lines.append(line.decode().rstrip("\n"))
        assert lines[-1].startswith(f"listening on http://127.0.0.1:{port} ")

        post = [
            {"destination": "web-a", "content": {"order": 1}},
            {"destination": "web-a", "content": "urgent", "emergency": True},
            {"destination": "web-b", "content": [1, 2], "delay": 60},
        ]
        ids = []
        for body in post:
            status, reply = await asyncio.to_thread(http, "POST", base + "/messages", body)
            assert status == 201, reply
            ids.append(reply["id"])
        bad_bodies = [
            {"content": 1}, {"destination": ""}, {"destination": "d", "delay": -1},
            {"destination": "d", "emergency": "yes"}, {"destination": "d", "x": 1},
        ]  # fmt: skip
        for bad in bad_bodies:
            status, reply = await asyncio.to_thread(http, "POST", base + "/messages", bad)
            assert status == 400 and reply["error"], (bad, reply)

        status, stats = await asyncio.to_thread(http, "GET", base + "/stats")
        assert status == 200
        assert stats["queued"] == {"emergency": 1, "timed": 1, "normal": 1}
        assert stats["dead"] == 0
        by_dest = {d: {k: n for k, n in c.items() if n} for d, c in stats["destinations"].items()}
        assert by_dest == {"web-a": {"emergency": 1, "normal": 1}, "web-b": {"timed": 1}}
        assert stats["next_due"] > time.time() + 30

        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            out, _ = await proc.communicate()
        lines += out.decode().splitlines()
        assert proc.returncode == 0, "\n".join(lines)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # it only writes: nothing to say about a throttle state store
    assert not any("no store URL given" in line for line in lines), lines

    remaining, _ = await queued_ids(backend.url)
    assert remaining == set(ids)
    async with mvalve_async.open(backend.url, "memory://", create=False) as pipe:
        rows = await pipe.queue.peek(10, Lane.EMERGENCY)
    assert decode(rows[0]["blob"]).content == "urgent"
