"""A three-node MariaDB Galera cluster on loopback, for tests that need a real one.

Each node is a `mariadbd` of our own (datadir under a temporary folder, ports of
its own), with Debian's `galera-4` provider and rsync SST. The first node is
bootstrapped (`--wsrep-new-cluster`); the others join it by SST. Tests may
`kill -9` a node and `restart` it: it recovers its position (`--wsrep-recover`)
and rejoins by IST.

Ports (base 3311 unless ``MVALVE_GALERA_PORT`` says otherwise), node i = 0, 1, 2:
SQL base+i, gcomm base+1260+i, IST base+1263+i, SST base+1266+i (3311 -> 4571,
4574, 4577): each base of BASE_PORTS has nine ports of its own, base+1260 to +1268, so
two clusters on one host (another worktree's) never share one. (With IST at
base+1270 and SST at base+1280, the cluster on 3321 had its gcomm ports where the
one on 3311 listens for IST, and a node of 3311 restarted while 3321 ran could not
rejoin: "Failed to open IST listener ... Address already in use".) The IST port is
set explicitly: its default, gcomm + 1, is the next node's gcomm port on one host.

Small on purpose (the development machines have 2 shared cores): 32 MB buffer
pool, no performance schema, one applier thread, a 64 MB gcache. No thread cache
(see `_args`), and a tmpdir per node (see `GaleraNode.__init__`).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pymysql

HOST = "127.0.0.1"
PROVIDERS = ("/usr/lib/galera/libgalera_smm.so", "/usr/lib/libgalera_smm.so")
CLUSTER_NAME = "mvalve_test"
BASE_PORTS = (3311, 3321, 3331, 3341)
_RECOVERED = re.compile(r"WSREP: Recovered position:?\s+(\S+:-?\d+)")


def provider() -> str | None:
    return next((p for p in PROVIDERS if os.path.exists(p)), None)


def available() -> str | None:
    """None when a cluster can be started here, else what is missing."""
    missing = [
        name
        for name, ok in [
            ("galera-4 (libgalera_smm.so)", provider() is not None),
            ("mariadbd", bool(shutil.which("mariadbd") or os.path.exists("/usr/sbin/mariadbd"))),
            ("mariadb-install-db", bool(shutil.which("mariadb-install-db"))),
            ("rsync", bool(shutil.which("rsync"))),
            ("wsrep_sst_rsync", bool(shutil.which("wsrep_sst_rsync"))),
            ("ss or lsof (rsync SST)", bool(shutil.which("ss") or shutil.which("lsof"))),
        ]
        if not ok
    ]
    return ", ".join(missing) + " not installed" if missing else None


def run_as() -> str | None:
    """The user the nodes run as: `mysql` when we are root. (Not root itself: rsync
    SST's daemon, started as root, would write as `nobody` and fail.)"""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("mysql")
    except KeyError:
        raise RuntimeError("running as root needs a `mysql` user for the Galera nodes") from None
    return "mysql"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _user_flag() -> list[str]:
    user = run_as()
    return [f"--user={user}"] if user else []


def _give(path: Path) -> None:
    """Make `path` (recursively) the nodes' user's."""
    user = run_as()
    if user:
        entry = pwd.getpwnam(user)
        for root, dirs, files in os.walk(path):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                os.chown(name, entry.pw_uid, entry.pw_gid)


class GaleraNode:
    def __init__(self, cluster: GaleraCluster, index: int, base: int) -> None:
        self.cluster = cluster
        self.index = index
        self.name = f"node{index + 1}"
        self.host = HOST
        self.port = base + index
        self.gcomm_port = base + 1260 + index
        self.ist_port = base + 1263 + index
        self.sst_port = base + 1266 + index
        self.dir = cluster.dir / self.name
        self.datadir = self.dir / "data"
        # Its own tmpdir: a mariadbd that starts (a bootstrap too) deletes every
        # `#sql*` file in its tmpdir, another server's temporary tables included.
        # Three installs at once sharing /tmp: 2 of 6 tries failed ("Unknown table
        # 'mysql.tmp_user_sys'"); with a tmpdir each, 0 of 10.
        self.tmpdir = self.dir / "tmp"
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<GaleraNode {self.name} {HOST}:{self.port}>"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _args(self, *extra: str) -> list[str]:
        c = self.cluster
        options = ";".join([
            f"base_host={HOST}", f"base_port={self.gcomm_port}",
            f"gmcast.listen_addr=tcp://{HOST}:{self.gcomm_port}",
            f"ist.recv_addr={HOST}:{self.ist_port}",
            "gcache.size=64M", "gcs.fc_limit=64",
        ])  # fmt: skip
        return [
            shutil.which("mariadbd") or "/usr/sbin/mariadbd", "--no-defaults",
            f"--datadir={self.datadir}", *_user_flag(), f"--port={self.port}",
            f"--bind-address={HOST}", f"--socket={self.dir}/sock", f"--pid-file={self.dir}/pid",
            f"--log-error={self.dir}/err.log", f"--tmpdir={self.tmpdir}", "--max-connections=200",
            "--innodb-buffer-pool-size=32M", "--performance-schema=OFF",
            "--innodb-flush-log-at-trx-commit=2", "--skip-name-resolve",
            "--binlog-format=ROW", "--innodb-autoinc-lock-mode=2",
            "--wsrep-on=ON", f"--wsrep-provider={provider()}",
            f"--wsrep-cluster-name={CLUSTER_NAME}",
            f"--wsrep-cluster-address=gcomm://{c.gcomm_list()}",
            f"--wsrep-node-name={self.name}", f"--wsrep-node-address={HOST}:{self.gcomm_port}",
            f"--wsrep-node-incoming-address={HOST}:{self.port}",
            f"--wsrep-provider-options={options}",
            "--wsrep-sst-method=rsync", f"--wsrep-sst-receive-address={HOST}:{self.sst_port}",
            # No thread cache: on MariaDB 10.11.19 a cached server thread that was
            # brute-force aborted fails the next connection's first statement with
            # 1213. After five runs of 20,000 messages, 151 of 600 new connections
            # failed so; with thread_cache_size=0, 3 of 600 (the threads cached
            # before), and 0 opens in 10 runs.
            "--wsrep-slave-threads=1", "--thread-cache-size=0",
            *extra,
        ]  # fmt: skip

    def install_process(self) -> subprocess.Popen[bytes]:
        """`mariadb-install-db` into the node's datadir, started (not waited for); its
        output goes to install.log."""
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        _give(self.dir)
        with open(self.dir / "install.log", "ab") as log:  # the child keeps its own copy
            return subprocess.Popen(
                ["mariadb-install-db", "--no-defaults", f"--datadir={self.datadir}",
                 *_user_flag(), "--auth-root-authentication-method=normal", "--skip-test-db",
                 f"--tmpdir={self.tmpdir}"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def launch(self, *extra: str) -> None:
        """Start the process (it joins, or with --wsrep-new-cluster bootstraps);
        `GaleraCluster.wait_synced` waits for it."""
        with open(self.dir / "stdout.log", "ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                self._args(*extra), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def connect(self, timeout: float = 2.0, **kw: Any) -> pymysql.connections.Connection[Any]:
        return pymysql.connect(
            host=HOST, port=self.port, user="root", connect_timeout=timeout,
            read_timeout=max(timeout, 5.0), write_timeout=timeout, autocommit=True, **kw,
        )  # fmt: skip

    def status(self) -> dict[str, str]:
        """wsrep_* status variables ({} when the node does not answer)."""
        try:
            conn = self.connect()
        except pymysql.err.MySQLError:
            return {}
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW GLOBAL STATUS LIKE 'wsrep%%'")
                return {str(k): str(v) for k, v in cur.fetchall()}
        except pymysql.err.MySQLError:
            return {}
        finally:
            conn.close()

    def synced(self, size: int) -> bool:
        s = self.status()
        return (
            s.get("wsrep_local_state_comment") == "Synced"
            and s.get("wsrep_cluster_status") == "Primary"
            and s.get("wsrep_ready") == "ON"
            and s.get("wsrep_cluster_size") == str(size)
        )

    def error_log(self, chars: int = 3000) -> str:
        text = ""
        for name in ("err.log", "stdout.log"):
            with contextlib.suppress(OSError):
                text += (self.dir / name).read_text(errors="replace")[-chars:]
        return text

    def kill(self) -> None:
        """kill -9: a crash, not a shutdown."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.proc = None

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None

    def recover_position(self) -> str | None:
        """`mariadbd --wsrep-recover`: the last committed position (uuid:seqno) read
        from InnoDB after a crash, for `--wsrep-start-position` (then IST suffices)."""
        log = self.dir / "recover.log"
        with contextlib.suppress(FileNotFoundError):
            log.unlink()
        args = [a for a in self._args() if not a.startswith("--log-error=")]
        subprocess.run(
            [*args, f"--log-error={log}", "--wsrep-recover"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, check=False,
        )  # fmt: skip
        found = _RECOVERED.findall(log.read_text(errors="replace")) if log.exists() else []
        return found[-1] if found else None

    def restart(self, timeout: float = 60.0) -> None:
        """Start a node that was killed or stopped again: recover its position,
        rejoin (IST when the donor's gcache still has what it missed), wait Synced."""
        if self.alive:
            raise RuntimeError(f"{self.name} is running")
        position = self.recover_position()
        extra = [f"--wsrep-start-position={position}"] if position else []
        self.launch(*extra)
        self.cluster.wait_synced(timeout, nodes=[self])


class GaleraCluster:
    def __init__(self, workdir: Path, base: int | None = None, size: int = 3) -> None:
        self.dir = workdir
        self.size = size
        if base is None and os.environ.get("MVALVE_GALERA_PORT"):
            base = int(os.environ["MVALVE_GALERA_PORT"])
        self.nodes = [GaleraNode(self, i, base or BASE_PORTS[0]) for i in range(size)]
        self.fixed_ports = base is not None
        self.start_seconds = 0.0

    def _pick_ports(self) -> None:
        """The first of BASE_PORTS whose ports are all free (another worktree's
        cluster may hold the first)."""
        if self.fixed_ports:
            return
        for base in BASE_PORTS:
            self.nodes = [GaleraNode(self, i, base) for i in range(self.size)]
            if not self.busy_ports():
                return

    def gcomm_list(self) -> str:
        return ",".join(f"{HOST}:{n.gcomm_port}" for n in self.nodes)

    def url(self, *, failover: bool = True, dialect: str = "innodb") -> str:
        """A URL naming every node (as one cluster when `failover`)."""
        hosts = ",".join(n.address for n in self.nodes)
        return f"mysql+{dialect}://root@{hosts}/test" + ("?cluster=failover" if failover else "")

    def busy_ports(self) -> list[int]:
        return [
            p
            for n in self.nodes
            for p in (n.port, n.gcomm_port, n.ist_port, n.sst_port)
            if not _port_free(p)
        ]

    def start(self, timeout: float = 60.0) -> None:
        t0 = time.monotonic()
        missing = available()
        if missing:
            raise RuntimeError(missing)
        self._pick_ports()
        busy = self.busy_ports()
        if busy:
            raise RuntimeError(
                f"ports {busy} are in use (another cluster? set MVALVE_GALERA_PORT to move)"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        if run_as():  # the nodes' user must reach its datadir
            os.chmod(self.dir, 0o755)
        installs = [node.install_process() for node in self.nodes]  # in parallel
        for node, proc in zip(self.nodes, installs, strict=True):
            if proc.wait() != 0:
                log = (node.dir / "install.log").read_text(errors="replace")
                raise RuntimeError(f"mariadb-install-db failed for {node.name}:\n{log[:1500]}")
            _give(node.dir)
        first, *others = self.nodes
        try:
            first.launch("--wsrep-new-cluster")
            self.wait_synced(timeout, nodes=[first], size=1)
            with first.connect() as conn, conn.cursor() as cur:
                # Over TCP the server sees 127.0.0.1 (skip-name-resolve), not localhost.
                cur.execute("CREATE USER IF NOT EXISTS root@'127.0.0.1'")
                cur.execute("GRANT ALL ON *.* TO root@'127.0.0.1' WITH GRANT OPTION")
                cur.execute("CREATE DATABASE IF NOT EXISTS test")
            for node in others:  # together: a joiner without a free donor waits for one
                node.launch()
            self.wait_synced(timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0

    def wait_synced(
        self, timeout: float = 60.0, nodes: list[GaleraNode] | None = None, size: int | None = None
    ) -> None:
        """Until every node of `nodes` (default: all) is Synced in a primary component
        of `size` nodes (default: the cluster's size). Polls the servers' status."""
        nodes = nodes if nodes is not None else self.nodes
        size = size if size is not None else len(self.nodes)
        deadline = time.monotonic() + timeout
        while True:
            dead = [n for n in nodes if not n.alive]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited while starting:\n{dead[0].error_log()}")
            if all(n.synced(size) for n in nodes):
                return
            if time.monotonic() > deadline:
                states = {n.name: n.status().get("wsrep_local_state_comment") for n in nodes}
                raise RuntimeError(
                    f"Galera nodes not Synced after {timeout} s ({states}):\n"
                    + nodes[-1].error_log()
                )
            time.sleep(0.2)

    def wait_state(self, node: GaleraNode, state: str, timeout: float = 30.0) -> None:
        """Until `node`'s wsrep_local_state_comment is `state` (polls its status)."""
        deadline = time.monotonic() + timeout
        while node.status().get("wsrep_local_state_comment") != state:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node.name} did not reach {state} in {timeout} s")
            time.sleep(0.1)

    def wait_size(self, size: int, timeout: float = 30.0) -> float:
        """Until the live nodes see a primary component of `size`; the seconds it took."""
        t0 = time.monotonic()
        while True:
            live = [n for n in self.nodes if n.alive]
            if live and all(n.synced(size) for n in live):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the cluster did not reach size {size} in {timeout} s")
            time.sleep(0.1)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _main(argv: list[str]) -> int:
    """``python -m tests.galera_proc start DIR`` leaves a cluster running in DIR (for
    experiments and benchmarks); ``stop DIR`` ends it and removes DIR."""
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python -m tests.galera_proc start|stop DIR")
        return 2
    workdir = Path(argv[1])
    if argv[0] == "start":
        cluster = GaleraCluster(workdir)
        cluster.start()
        print(f"started in {cluster.start_seconds:.1f} s: {cluster.url()}")
        return 0
    for pidfile in sorted(workdir.glob("node*/pid")):
        with contextlib.suppress(ValueError, ProcessLookupError):
            os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
    deadline = time.monotonic() + 30
    while any((workdir / n / "pid").exists() for n in ("node1", "node2", "node3")):
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(_main(sys.argv[1:]))
