"""The benchmark harness runs end to end (`--quick`) and reports a ratio for every
case. Speed is never asserted: only that the figures exist and the tables are gone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import MYSQL_URL, require_mysql

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
