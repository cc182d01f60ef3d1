"""A private mariadbd (own datadir and port) that tests may kill -9 and restart."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class MariaDBProcess:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.datadir = workdir / "data"
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mysql+innodb://root@{HOST}:{self.port}/test"

    @staticmethod
    def available() -> bool:
        return bool(shutil.which("mariadbd") or os.path.exists("/usr/sbin/mariadbd")) and bool(
            shutil.which("mariadb-install-db")
        )

    def install(self) -> None:
        subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={self.datadir}", "--user=root",
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def start(self, timeout: float = 30.0) -> None:
        binary = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
        self.proc = subprocess.Popen(
            [binary, "--no-defaults", f"--datadir={self.datadir}", "--user=root",
             f"--port={self.port}", f"--bind-address={HOST}", f"--socket={self.dir}/sock",
             f"--pid-file={self.dir}/pid", "--skip-log-bin", "--innodb-buffer-pool-size=32M",
             f"--log-error={self.dir}/err.log", "--max-connections=200"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            ok = subprocess.run(
                ["mysql", "-uroot", f"-h{HOST}", f"-P{self.port}", "-e",
                 "CREATE DATABASE IF NOT EXISTS test"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ).returncode == 0  # fmt: skip
            if ok:
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "err.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"private mariadbd did not start:\n{log}")
            time.sleep(0.1)

    def kill(self) -> None:
        """kill -9: a crash, not a shutdown."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None
