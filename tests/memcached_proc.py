"""An extra memcached daemon on a free loopback port, for tests that kill it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

HOST = "127.0.0.1"


def _reachable(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            sock.sendall(b"version\r\n")
            return sock.recv(64).startswith(b"VERSION")
    except OSError:
        return False


def _unavailable(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI is set: the memcached store tests must run)", pytrace=False)
    pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until(cond: Callable[[], bool], what: str, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.02)


class MemcachedProcess:
    """An extra memcached daemon on a free loopback port, stoppable and restartable."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.port = _free_port()
        self.pidfile = workdir / f"memcached-{self.port}.pid"
        self.args = args
        self.pid: int | None = None

    def start(self) -> None:
        cmd = ["memcached", "-d", "-l", HOST, "-p", str(self.port), "-P", str(self.pidfile)]
        if os.geteuid() == 0:
            cmd += ["-u", "root"]
        subprocess.run([*cmd, *self.args], check=True)
        _wait_until(lambda: _reachable(self.port), f"memcached listens on {self.port}")
        _wait_until(lambda: self.pidfile.exists() and self.pidfile.read_text().strip() != "", "pid")
        self.pid = int(self.pidfile.read_text())

    def stop(self) -> None:
        """Kill the daemon (SIGKILL: a crash, and instant; SIGTERM takes a second)."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

        def dead() -> bool:  # gone, or a zombie nobody has reaped yet
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except FileNotFoundError:
                return True
            return stat.rsplit(")", 1)[1].split()[0] == "Z"

        _wait_until(dead, f"memcached {pid} exits")
        _wait_until(lambda: not _reachable(self.port), f"port {self.port} is closed")

    @property
    def label(self) -> str:
        return f"{HOST}:{self.port}"
