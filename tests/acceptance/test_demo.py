"""`mvalve demo`: zero setup, as a subprocess in a fresh directory; and, slow, from a
new venv after `pip install <repo>`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

import mvalve_async
from mvalve_async.cli.demo import demo_file, max_in_window, plan
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
    # stdout is not a terminal: plain progress lines, labelled, no live view
    line = r"^\s*\d+\.\ds  done/written: demo-sms \d+/\d+, .*; dead letters: \d+$"
    assert re.search(line, result.stdout, re.M), result.stdout
    assert "\x1b[" not in result.stdout
    assert (tmp_path / "mvalve-demo.sqlite3").stat().st_size > 100

    # the closing lines give the commands that show this queue, and they work
    out = " ".join(result.stdout.split())
    assert "The queue stays in mvalve-demo.sqlite3, in this directory." in out
    lines = result.stdout.splitlines()
    assert "  mvalve --url sqlite:///mvalve-demo.sqlite3 stats" in lines
    dead = int(re.search(r"(\d+) dead letters, of", out).group(1))  # type: ignore[union-attr]
    stats = mvalve("--url", "sqlite:///mvalve-demo.sqlite3", "stats", "--json", cwd=tmp_path)
    assert stats.returncode == 0, stats.stderr
    snap = json.loads(stats.stdout)
    assert snap["dead"] == dead and set(snap["destinations"]) <= {"demo-email"}
    if dead:
        listed = [ln for ln in lines if ln.startswith("  mvalve --url sqlite:///")]
        assert listed[1].startswith("  mvalve --url sqlite:///mvalve-demo.sqlite3 dead list")


def test_demo_in_a_directory_it_cannot_write_to_uses_a_temporary_one(tmp_path: Path) -> None:
    """Root may write anywhere, so the unwritable directory is one that is gone: the
    child's working directory is removed after its chdir, before exec."""
    gone, temp = tmp_path / "gone", tmp_path / "temp"
    gone.mkdir()
    temp.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "mvalve_async.cli", "demo", "--messages", "20", "--seconds", "1"],
        cwd=gone, env={**env(), "TMPDIR": str(temp)}, preexec_fn=lambda: os.rmdir(gone),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert_summary(result.stdout, 20)
    (made,) = temp.glob("mvalve-demo-*/mvalve-demo.sqlite3")
    out = " ".join(result.stdout.split())
    assert f"The queue stays in {made} (the current directory was not writable)." in out
    assert f"  mvalve --url sqlite:///{made} stats" in result.stdout.splitlines()


def test_demo_file_is_made_where_it_can_be(tmp_path: Path) -> None:
    assert demo_file(str(tmp_path)) == str(tmp_path / "mvalve-demo.sqlite3")
    assert (tmp_path / "mvalve-demo.sqlite3").exists()
    not_a_directory = tmp_path / "mvalve-demo.sqlite3"  # a file: nothing can be made "in" it
    fallback = Path(demo_file(str(not_a_directory)))
    try:
        assert fallback.name == "mvalve-demo.sqlite3" and fallback.parent.is_dir()
        assert fallback.parent.name.startswith("mvalve-demo-")
        assert fallback.parent.parent == Path(tempfile.gettempdir())
    finally:
        shutil.rmtree(fallback.parent)


def test_live_view_prints_log_records_above_itself(tmp_path: Path) -> None:
    """A terminal (rich is told so): the dead letters' warnings go through the live
    view's console, each on a line of its own above the view, not into it or onto
    stderr."""
    term = {**env(), "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "160"}
    result = subprocess.run(
        [sys.executable, "-m", "mvalve_async.cli", "demo", "--messages", "40", "--seconds", "2"],
        cwd=tmp_path, env=term, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", result.stdout)
    assert "progress" in plain and "done/written" in plain  # the view's labels
    dead = int(re.search(r"(\d+) dead letters, of", " ".join(plain.split())).group(1))  # type: ignore[union-attr]
    assert dead > 0  # the emergency window drops some: there is something to log
    logged = [ln for ln in re.split(r"\r\n|\r|\n", plain) if "dead letter:" in ln]
    assert len(logged) == dead, plain
    for line in logged:
        assert re.match(r"^(\[[^\]]+\])?\s+WARNING\s+dead letter: \w+ for demo-email", line), line
    assert "dead letter" not in result.stderr


def test_demo_help_gives_its_own_defaults() -> None:
    result = mvalve("demo", "--help", cwd=REPO)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert (
        "--url URL queue URL (default: a fresh mvalve-demo.sqlite3; $MVALVE_URL is not read)"
        in text
    )
    assert "--store URL state store URL (default: memory://; $MVALVE_STORE_URL is not read)" in text
    assert "else sqlite:///mvalve.sqlite3" not in text
    other = " ".join(mvalve("stats", "--help", cwd=REPO).stdout.split())
    assert "(default: $MVALVE_URL, else sqlite:///mvalve.sqlite3)" in other  # others unchanged


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
