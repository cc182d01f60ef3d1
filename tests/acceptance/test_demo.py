"""`mvalve demo`: zero setup, as a subprocess in a fresh directory; and, slow, from a
new venv after `pip install <repo>`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import mvalve_async
from mvalve_async.demo import max_in_window, plan
from tests.services import MEMCACHED_URL, MYSQL_URL, require_memcached, require_mysql

REPO = Path(__file__).resolve().parents[2]


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("MVALVE_URL", "MVALVE_STORE_URL")}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), out.get("PYTHONPATH")]))
    out["COLUMNS"] = "100"
    return out


def mvalve(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mvalve_async.cli", *args], cwd=cwd, env=env(),
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def assert_summary(out: str, total: int) -> None:
    assert "summary" in out
    for name in ("demo-sms", "demo-push", "demo-email", "demo-webhook"):
        assert re.search(rf"^{name}\s", out, re.M), out
    m = re.search(r"(\d+) delivered, (\d+) dead letters, of (\d+) written", out)
    assert m, out
    delivered, dead, written = map(int, m.groups())
    assert written == total and delivered + dead == total
    assert "Rate promise on hand-out times (msg.delivered_at): kept." in " ".join(out.split())


def test_demo_with_no_setup(tmp_path: Path) -> None:
    (tmp_path / "mvalve-demo.sqlite3").write_bytes(b"not a database: the demo clears it")
    result = mvalve("demo", "--messages", "60", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_summary(result.stdout, 60)
    # stdout is not a terminal: plain progress lines, no live view
    assert re.search(r"^\s*\d+\.\ds\s+demo-sms \d+/\d+", result.stdout, re.M)
    assert "\x1b[" not in result.stdout
    assert (tmp_path / "mvalve-demo.sqlite3").stat().st_size > 100


def test_demo_on_mariadb_and_memcached_refuses_a_busy_queue(tmp_path: Path) -> None:
    require_mysql()
    require_memcached()
    sfx = uuid.uuid4().hex[:8]
    url = f"{MYSQL_URL}?emergency=e_d{sfx}&timed=t_d{sfx}&normal=n_d{sfx}&dead=d_d{sfx}"
    store = f"{MEMCACHED_URL}?namespace=demo{sfx}"
    try:
        result = mvalve("demo", "--url", url, "--store", store, "--messages", "40",
                        "--seconds", "2", cwd=tmp_path)  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert_summary(result.stdout, 40)
        assert not (tmp_path / "mvalve-demo.sqlite3").exists()

        assert mvalve("--url", url, "send", "someone", "real", cwd=tmp_path).returncode == 0
        result = mvalve("demo", "--url", url, "--messages", "40", cwd=tmp_path)
        assert result.returncode == 1
        assert "already holds 1 queued message" in " ".join(result.stderr.split())
    finally:
        assert mvalve("--url", url, "drop", "--yes", cwd=tmp_path).returncode == 0


def test_the_plan_fits_the_time_and_the_window_count_is_half_open() -> None:
    p = plan(300, 12.0)
    assert [d.rate.n if d.rate else None for d in p.destinations] == [40, 20, 10, None]
    assert sum(d.written for d in p.destinations) == len(p.messages) + 1 == 300
    assert sum(m.duration is not None for m in p.messages) == 1
    assert p.emergency.emergency and p.emergency_at == 6.0
    assert max_in_window([0.0, 0.5, 1.0, 1.5, 1.99999], 1.0) == 3
    assert max_in_window([0.0, 0.5, 1.0, 1.5, 1.9999999], 1.0) == 2  # to the microsecond
    assert max_in_window([0.0, 1.0, 2.0], 1.0) == 1
    with pytest.raises(mvalve_async.ConfigError):
        plan(5, 12.0)


@pytest.mark.slow
def test_pip_install_then_mvalve_demo_in_a_clean_venv(tmp_path: Path) -> None:
    """The README's first command as on a fresh machine: a new venv that sees nothing
    of this one (no system site packages), `pip install <checkout>` as pip does it by
    default (an isolated build that fetches the build requirements, the dependencies
    from the index: what the README's own install needs too), then `mvalve demo` from
    an unrelated directory. The checkout is copied first, so the build leaves no
    build/ or egg-info in it."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "mvalve_async", src / "mvalve_async",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    clean = {k: v for k, v in env().items() if k != "PYTHONPATH"}
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(src)],
        env=clean, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import mvalve_async; print(mvalve_async.__file__)"],
        cwd=run_dir, env=clean, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(venv)
    demo = subprocess.run([str(venv / "bin" / "mvalve"), "demo"], cwd=run_dir, env=clean,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert_summary(demo.stdout, 300)
    assert (run_dir / "mvalve-demo.sqlite3").exists()
