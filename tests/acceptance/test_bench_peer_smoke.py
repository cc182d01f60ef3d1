"""The peer scenario (ours beside Dramatiq) runs end to end (`--quick`) and reports
both sides. Dramatiq is the optional `.[bench]` extra and Redis is not one of the
services CI starts: without either the test is skipped. Speed is never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import MEMCACHED_URL, MYSQL_URL, reachable, require_memcached, require_mysql

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.mysql
@pytest.mark.memcached
@pytest.mark.slow
def test_quick_peer_bench_reports_ours_beside_dramatiq(tmp_path: Path) -> None:
    pytest.importorskip("dramatiq", reason="the optional extra: pip install -e '.[bench]'")
    pytest.importorskip("redis")
    if not reachable("127.0.0.1", 6379):
        pytest.skip("Redis is not reachable on 127.0.0.1:6379")
    require_mysql()
    require_memcached()
    out = tmp_path / "peer.json"
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--scenarios", "peer",
         "--json", str(out), "--mysql-url", MYSQL_URL, "--memcached-url", MEMCACHED_URL],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": path},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    peer = json.loads(out.read_text())["scenarios"]["peer"]
    assert peer["error"] is None
    cases = {c["name"]: c for c in peer["cases"]}
    drain = cases["drain time"]
    assert drain["baseline"]["name"] == "Dramatiq"
    assert drain["ours"]["median"] > 0 and drain["baseline"]["median"] > 0
    assert drain["extra"]["ours lost"]["median"] == 0
    assert drain["extra"]["baseline lost"]["median"] is not None  # reported, not asserted
    assert "baseline drain / ideal" in drain["extra"]
    assert cases["windows over rate (sliding 1 s)"]["baseline"]["median"] is not None
    assert cases["rate-limit retries/msg"]["baseline"]["runs"]
    assert peer["facts"]["redis_keys_left"] == 0
