"""The benchmark harness runs end to end (`--quick`) and reports a ratio for every
case. Speed is never asserted: only that the figures exist and the tables are gone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import MEMCACHED_URL, MYSQL_URL, require_memcached, require_mysql

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.mysql
@pytest.mark.slow
def test_quick_bench_reports_ratios_for_writer_and_reader(tmp_path: Path) -> None:
    require_mysql()
    out = tmp_path / "bench.json"
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--scenarios", "writer,reader",
         "--json", str(out), "--mysql-url", MYSQL_URL],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": path},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["config"]["quick"] is True
    for name in ("writer", "reader"):
        scenario = data["scenarios"][name]
        assert scenario["error"] is None
        assert scenario["cases"], name
        for case in scenario["cases"]:
            assert case["ours"]["runs"] and case["baseline"]["runs"], case["name"]
            assert case["ratio"] is not None and case["ratio"] > 0, case["name"]
    assert len(data["scenarios"]["reader"]["cases"]) == 6  # 1/4/8 consumers x single/batched
    for when in ("start", "end"):
        machine = data["machine"][when]
        assert machine["nproc"] >= 1 and len(machine["load_average"]) == 3
    assert data["cleanup"]["dropped"] and data["cleanup"]["left"] == []


@pytest.mark.mysql
@pytest.mark.memcached
@pytest.mark.slow
def test_quick_throttle_bench_draws_its_deliveries(tmp_path: Path) -> None:
    """`--plot` on a real (quick) throttle run writes a PNG; what it draws is checked
    by tests/unit/test_bench_plot.py, on known input."""
    require_mysql()
    require_memcached()
    out, png = tmp_path / "bench.json", tmp_path / "throttle.png"
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--scenarios", "throttle",
         "--json", str(out), "--plot", str(png),
         "--mysql-url", MYSQL_URL, "--memcached-url", MEMCACHED_URL],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": path},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    throttle = json.loads(out.read_text())["scenarios"]["throttle"]
    assert throttle["error"] is None and "timelines" not in throttle  # not in the JSON
