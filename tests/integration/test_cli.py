"""`mvalve` end to end: in-process through `main([...])`, and as a real subprocess,
against MariaDB (unique tables per test, dropped after) and SQLite in tmp_path."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import types
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import mvalve_async
from mvalve_async.cli import commands, common, main
from mvalve_async.clock import LocalClock
from mvalve_async.interfaces import Lease, Queue, Want
from mvalve_async.registry import make_queue, make_store
from mvalve_async.throttle import Rate, Valve
from tests.services import MEMCACHED_URL, MYSQL_URL, require_memcached, require_mysql

ROOT = Path(mvalve_async.__file__).resolve().parents[1]
BAD_PASSWORD_URL = "mysql+innodb://root:s3cretpw@127.0.0.1/test"
T = TypeVar("T")


def _tables() -> tuple[str, list[str]]:
    sfx = uuid.uuid4().hex[:8]
    names = [f"e_{sfx}", f"t_{sfx}", f"n_{sfx}", f"d_{sfx}"]
    return "emergency={}&timed={}&normal={}&dead={}".format(*names), names


def _with_tables(base: str) -> str:
    query, _ = _tables()
    return base + ("&" if "?" in base else "?") + query


Run = tuple[int, str, str]


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps table cells at 80 columns otherwise
    monkeypatch.delenv("MVALVE_URL", raising=False)
    monkeypatch.delenv("MVALVE_STORE_URL", raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def subprocess_cli(
    *argv: str, input: str | None = None, stdin: int | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.pop("MVALVE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "mvalve_async.cli", *argv],
        capture_output=True, text=True, env=env, timeout=60, input=input, stdin=stdin,
    )  # fmt: skip


def with_queue(url: str, fn: Callable[[Queue], Awaitable[T]]) -> T:
    """Run `await fn(queue)` on a connected queue for `url` (test set-up by the Queue API)."""

    async def go() -> T:
        queue = make_queue(url)
        await queue.connect()
        try:
            return await fn(queue)
        finally:
            await queue.close()

    return asyncio.run(go())


async def _claim(queue: Queue, limit: int) -> list[Lease]:
    """Up to `limit` claimable rows: the emergency lane's, then each destination's."""
    now = queue.clock.now()
    scan = await queue.scan(now)
    leases = await queue.claim([], now, 30.0, emergency=limit)
    for dest in sorted(scan.found):
        if len(leases) < limit:
            leases += await queue.claim([Want(dest, limit - len(leases))], now, 30.0)
    return leases


async def _kill_first(queue: Queue) -> int:
    leases = await _claim(queue, 1)
    await queue.dead(leases, "carrier said no")
    return len(leases)


@pytest.fixture(params=["innodb", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A queue URL with its own tables, created by `mvalve create`, dropped after."""
    if request.param == "innodb":
        require_mysql()
        base = MYSQL_URL
    else:
        base = f"sqlite:///{tmp_path}/queue.db"
    url = _with_tables(base)
    assert main(["--url", url, "create"]) == 0
    yield url
    assert main(["--url", url, "drop", "--yes"]) == 0


# -- create / drop ----------------------------------------------------------------


@pytest.mark.parametrize("base", [MYSQL_URL, "sqlite:///q.db"])
def test_create_print_shows_the_ddl_without_connecting(
    capsys: pytest.CaptureFixture[str], base: str
) -> None:
    query, names = _tables()
    # port 1: nothing listens there, so this passes only if --print does not connect
    base = base.replace("127.0.0.1:3306", "127.0.0.1:1")
    code, out, err = run(capsys, "--url", f"{base}?{query}", "create", "--print")
    assert code == 0, err
    assert out.count("CREATE TABLE") == 4
    for name in names:
        assert name in out


def test_create_reports_the_tables_and_drop_removes_them(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    code, out, _ = run(capsys, "--url", url, "create")  # idempotent
    assert code == 0 and "created" in out
    code, out, err = run(capsys, "--url", url, "drop", "--yes")
    assert code == 0, err
    assert run(capsys, "--url", url, "create")[0] == 0  # for the fixture to drop again


# -- send / stats / peek ----------------------------------------------------------


def test_send_stats_and_peek(
    capsys: pytest.CaptureFixture[str], url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run(capsys, "--url", url, "send", "carrier-a", "hello")[0] == 0
    code, out, err = run(capsys, "--url", url, "send", "carrier-b", '{"n": [1, 2]}', "--json",
                         "--count", "3", "--header", "X-Trace=abc")  # fmt: skip
    assert code == 0 and "sent 3 messages to carrier-b (normal lane)" in out, err
    assert run(capsys, "--url", url, "send", "carrier-b", "later", "--delay", "60")[0] == 0
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\x00raw\xff")))
    assert run(capsys, "--url", url, "send", "carrier-c", "-", "--emergency")[0] == 0

    stats = run_json(capsys, "--url", url, "stats")
    assert stats["queued"] == {"emergency": 1, "timed": 1, "normal": 4}
    assert stats["leased"] == {"emergency": 0, "timed": 0, "normal": 0}
    assert stats["dead"] == 0 and stats["destinations_total"] == 3
    assert stats["destinations"]["carrier-b"]["queued"] == {"emergency": 0, "timed": 1, "normal": 3}
    assert stats["next_due"] == pytest.approx(time.time() + 60, abs=10)
    assert "s3cret" not in json.dumps(stats)

    rows = run_json(capsys, "--url", url, "peek")
    assert [r["lane"] for r in rows] == [
        "emergency",
        "timed",
        "normal",
        "normal",
        "normal",
        "normal",
    ]
    assert rows[0]["content_base64"] == "AHJhd/8=" and rows[0]["emergency"] is True
    assert rows[1]["content"] == "later" and rows[1]["ready"] > time.time()
    assert rows[2]["content"] == "hello"
    assert rows[3]["content"] == {"n": [1, 2]} and rows[3]["headers"] == {"X-Trace": "abc"}
    assert {r["deliveries"] for r in rows} == {0} and not any(r["leased"] for r in rows)

    normal = run_json(capsys, "--url", url, "peek", "--lane", "normal", "--limit", "2")
    assert [r["content"] for r in normal] == ["hello", {"n": [1, 2]}]

    # peek claimed nothing: a claim still gets every due message, on first delivery
    async def claim_all(queue: Queue) -> list[tuple[str, int]]:
        leases = await _claim(queue, 10)
        return [(x.destination, x.deliveries) for x in leases]

    claimed = with_queue(url, claim_all)
    assert claimed[0] == ("carrier-c", 1)  # the emergency lane first
    assert sorted(claimed[1:]) == [("carrier-a", 1)] + [("carrier-b", 1)] * 3
    rows = run_json(capsys, "--url", url, "peek")
    assert sum(r["leased"] for r in rows) == 5
    assert run_json(capsys, "--url", url, "stats")["leased"]["normal"] == 4

    # the human views render
    code, out, err = run(capsys, "--url", url, "stats")
    assert code == 0 and "carrier-b" in out and "emergency" in out, err
    code, out, err = run(capsys, "--url", url, "peek")
    assert code == 0 and "hello" in out and "leased" in out, err


def test_stats_shows_pause_and_emergency_from_the_store(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    require_memcached()
    store_url = f"{MEMCACHED_URL}?namespace=cli{uuid.uuid4().hex[:8]}"
    for dest in ("paused", "urgent", "open"):
        assert run(capsys, "--url", url, "send", dest, "x")[0] == 0

    async def mark() -> None:
        store = make_store(store_url)
        try:
            valve = Valve(store, LocalClock(), rate=Rate(10, per=1.0))  # hand-outs logged
            await valve.pause("paused", 60)
            await valve.emergency("urgent", 30, None)
        finally:
            await store.close()

    asyncio.run(mark())
    stats = run_json(capsys, "--url", url, "--store", store_url, "stats")
    dests, now = stats["destinations"], time.time()
    assert dests["paused"]["paused_until"] == pytest.approx(now + 60, abs=5)
    assert dests["paused"]["emergency_until"] is None
    assert dests["urgent"]["emergency_until"] == pytest.approx(now + 30, abs=5)
    assert dests["urgent"]["last_sent"] == pytest.approx(now, abs=5)
    assert dests["open"]["paused_until"] is None and dests["open"]["emergency_until"] is None
    code, out, _ = run(capsys, "--url", url, "--store", store_url, "stats")
    assert code == 0 and "paused" in out and "emergency" in out


def test_stats_with_the_store_down_prints_the_queue_and_exits_3(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url, down = f"sqlite:///{tmp_path}/q.db", "memcached://127.0.0.1:1"  # nothing listens
    assert run(capsys, "--url", url, "create")[0] == 0
    # no destination to look up: the store is asked anyway
    code, out, err = run(capsys, "--url", url, "--store", down, "stats")
    assert (code, err) == (commands.STORE_UNREACHABLE, "") and commands.STORE_UNREACHABLE == 3
    assert "normal" in out and "state store: memcached 127.0.0.1:1" in " ".join(out.split())
    assert run(capsys, "--url", url, "send", "d", "x")[0] == 0
    code, out, _ = run(capsys, "--url", url, "--store", down, "stats", "--json")
    snap = json.loads(out)
    assert code == 3 and snap["queued"]["normal"] == 1 and "127.0.0.1:1" in snap["store_error"]
    assert snap["destinations"]["d"]["state_error"] == snap["store_error"]
    assert run(capsys, "--url", url, "stats")[0] == 0  # memory:// answers


# -- purge / dead letters ---------------------------------------------------------


def test_purge_with_yes(capsys: pytest.CaptureFixture[str], url: str) -> None:
    for dest in ("a", "a", "b"):
        assert run(capsys, "--url", url, "send", dest, "x")[0] == 0
    assert run(capsys, "--url", url, "send", "b", "x", "--delay", "60")[0] == 0
    code, out, err = run(capsys, "--url", url, "purge", "--destination", "a", "--yes")
    assert (code, out.strip()) == (0, "purged 2 messages"), err
    code, out, _ = run(capsys, "--url", url, "purge", "--lane", "timed", "--yes")
    assert (code, out.strip()) == (0, "purged 1 message")
    assert run_json(capsys, "--url", url, "stats")["queued"] == {
        "emergency": 0, "timed": 0, "normal": 1,
    }  # fmt: skip
    assert run(capsys, "--url", url, "purge", "-y")[1].strip() == "purged 1 message"


def test_purge_and_drop_without_yes_and_without_a_tty_refuse(
    capsys: pytest.CaptureFixture[str], url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run(capsys, "--url", url, "send", "a", "x")[0] == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    for argv in (["purge"], ["drop"], ["dead", "purge"]):
        code, out, err = run(capsys, "--url", url, *argv)
        assert code == 2 and out == ""
        assert err.startswith("mvalve: error: refusing to ") and "--yes" in err
        assert "Traceback" not in err
    assert run_json(capsys, "--url", url, "stats")["queued"]["normal"] == 1


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_purge_on_a_terminal_asks_first(
    capsys: pytest.CaptureFixture[str], url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run(capsys, "--url", url, "send", "a", "x", "--count", "2")[0] == 0
    monkeypatch.setattr(sys, "stdin", _Terminal("n\n"))
    code, out, err = run(capsys, "--url", url, "purge")
    assert code == 1 and "Delete every queued message" in err and "aborted" in err
    assert run_json(capsys, "--url", url, "stats")["queued"]["normal"] == 2
    monkeypatch.setattr(sys, "stdin", _Terminal("y\n"))
    code, out, err = run(capsys, "--url", url, "purge")
    assert (code, out.strip()) == (0, "purged 2 messages"), err


def test_dead_letters_list_requeue_purge(capsys: pytest.CaptureFixture[str], url: str) -> None:
    code, out, _ = run(capsys, "--url", url, "send", "carrier-x", '{"sms": "hi"}', "--json")
    assert code == 0
    message_id = out.split()[1]  # "sent <message id> to carrier-x (normal lane)"
    assert with_queue(url, _kill_first) == 1

    dead = run_json(capsys, "--url", url, "dead", "list")
    assert len(dead) == 1
    assert dead[0]["destination"] == "carrier-x" and dead[0]["reason"] == "carrier said no"
    assert dead[0]["lane"] == "normal" and dead[0]["content"] == {"sms": "hi"}
    assert dead[0]["message_id"] == message_id != str(dead[0]["id"])
    stats = run_json(capsys, "--url", url, "stats")
    assert stats["dead"] == 1 and stats["destinations"]["carrier-x"]["dead"] == 1
    code, out, _ = run(capsys, "--url", url, "dead", "list")
    assert code == 0 and "carrier said no" in out
    row = next(line for line in out.splitlines() if message_id in line)  # the one id
    assert row.split("│")[1].strip() == str(dead[0]["id"])  # beside the row id

    code, out, err = run(capsys, "--url", url, "dead", "requeue", str(dead[0]["id"]))
    assert (code, out.strip()) == (0, "requeued 1 of 1 dead letter"), err
    stats = run_json(capsys, "--url", url, "stats")
    assert stats["dead"] == 0 and stats["queued"]["normal"] == 1

    assert with_queue(url, _kill_first) == 1
    assert run(capsys, "--url", url, "dead", "requeue")[0] == 2  # IDs or --all
    code, out, _ = run(capsys, "--url", url, "dead", "requeue", "--all")
    assert (code, out.strip()) == (0, "requeued 1 dead letter")
    assert with_queue(url, _kill_first) == 1
    code, out, _ = run(capsys, "--url", url, "dead", "purge", "--yes")
    assert (code, out.strip()) == (0, "purged 1 dead letter")
    assert run_json(capsys, "--url", url, "dead", "list") == []
    assert run_json(capsys, "--url", url, "stats")["queued"]["normal"] == 0


# -- a queue that is not there ----------------------------------------------------


READ_ONLY = [["stats"], ["stats", "--json"], ["peek"], ["dead", "list"], ["statslog"],
             ["statslog", "prune"], ["purge", "-y"], ["dead", "requeue", "--all"],
             ["dead", "purge", "-y"], ["drop", "-y"]]  # fmt: skip


def test_commands_on_a_missing_sqlite_file_create_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "not" / "here" / "q.db"
    url = f"sqlite:///{path}"
    for argv in READ_ONLY:
        code, out, err = run(capsys, "--url", url, *argv)
        assert (code, out) == (1, ""), (argv, out, err)
        line = _one_error_line(err)
        assert f"{url}: the queue does not exist (no file {path};" in line, argv
        assert not (tmp_path / "not").exists(), argv
    # the commands that write make it, its directories too
    assert run(capsys, "--url", url, "send", "d", "x")[0] == 0
    assert path.is_file()
    assert run_json(capsys, "--url", url, "stats")["queued"]["normal"] == 1


def test_an_existing_file_without_the_tables_is_not_given_them(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "other.db"
    sqlite3.connect(path).close()  # an empty database: a file, but no queue in it
    code, out, err = run(capsys, "--url", f"sqlite:///{path}", "stats")
    assert (code, out) == (1, "")
    assert "the queue tables are missing" in _one_error_line(err)
    tables = sqlite3.connect(path).execute("SELECT name FROM sqlite_master").fetchall()
    assert tables == []


# -- errors -----------------------------------------------------------------------


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mvalve: error: ") and "Traceback" not in err
    return lines[0]


def test_bad_url_scheme_is_one_line_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--url", "postgres://u:hunter22@h/db", "stats")
    assert code == 1 and out == ""
    line = _one_error_line(err)
    assert "unknown queue URL scheme 'postgres'" in line and "hunter22" not in line
    code, _, err = run(capsys, "--url", "memory://", "--store", "redis://h", "stats")
    assert code == 1 and "unknown store URL scheme" in _one_error_line(err)


def test_wrong_password_is_reported_without_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    require_mysql()
    code, out, err = run(capsys, "--url", _with_tables(BAD_PASSWORD_URL), "stats")
    assert code == 1 and out == ""
    line = _one_error_line(err)
    assert "access denied" in line.lower()
    assert "s3cretpw" not in out + err and "root:***@127.0.0.1" in line


def test_unreachable_server_error_masks_the_password(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--url", "mysql+innodb://root:s3cretpw@127.0.0.1:1/test", "peek")
    assert code == 1 and "s3cretpw" not in err
    assert _one_error_line(err) == (
        "mvalve: error: cannot reach mysql+innodb://root:***@127.0.0.1:1/test: "
        "nothing listens on 127.0.0.1:1"
    )


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        [],
        ["send"],
        ["send", "d", "x", "--count", "0"],
        ["send", "d", "x", "--header", "novalue"],
        ["send", "d", "x", "--delay", "nan"],
        ["send", "d", "{nope", "--json"],
        ["peek", "--lane", "sideways"],
    ):
        code, _, err = run(capsys, "--url", "memory://", *argv)
        assert code == 2, (argv, err)
        assert "error:" in err and "Traceback" not in err
    code, _, err = run(capsys, "--url", "memory://", "send", "x" * 41, "body")
    assert code == 1 and "limit is 40" in _one_error_line(err)


# -- as a real process ------------------------------------------------------------


def test_subprocess_send_stats_and_errors(tmp_path: Path) -> None:
    require_mysql()
    url = _with_tables(MYSQL_URL)
    try:
        assert subprocess_cli("--url", url, "create").returncode == 0
        sent = subprocess_cli("send", "proc-dest", "-", "--url", url, input="from stdin")
        assert sent.returncode == 0 and "proc-dest" in sent.stdout, sent.stderr
        stats = subprocess_cli("--url", url, "stats", "--json")
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["destinations"]["proc-dest"]["queued"]["normal"] == 1
        refused = subprocess_cli("--url", url, "purge", stdin=subprocess.DEVNULL)
        assert refused.returncode == 2 and "--yes" in refused.stderr
    finally:
        assert subprocess_cli("--url", url, "drop", "--yes").returncode == 0

    bad = subprocess_cli("--url", BAD_PASSWORD_URL, "stats")
    assert bad.returncode == 1 and bad.stdout == ""
    assert "access denied" in _one_error_line(bad.stderr).lower()
    assert "s3cretpw" not in bad.stderr


def _default_sigint() -> None:
    """In the child, before exec: SIGINT as by default. A suite started with SIGINT
    ignored (a shell's background job) would pass SIG_IGN on, and Python then
    installs no KeyboardInterrupt handler: Ctrl-C would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_subprocess_url_from_the_environment_and_watch_until_ctrl_c(
    tmp_path: Path, stop: signal.Signals
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MVALVE_URL": f"sqlite:///{tmp_path}/w.db"}
    assert main(["--url", env["MVALVE_URL"], "create"]) == 0  # stats shows a queue that exists
    proc = subprocess.Popen(
        [sys.executable, "-m", "mvalve_async.cli", "stats", "--watch", "0.2", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=_default_sigint,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())  # the first refresh
        second = json.loads(proc.stdout.readline())  # ... and the next
        assert first["url"] == second["url"] == f"sqlite:///{tmp_path}/w.db"
        assert second["time"] > first["time"]
        proc.send_signal(stop)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:  # pragma: no cover - only when the test failed
            proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err, err


# -- plugins ----------------------------------------------------------------------


def test_a_plugin_module_adds_a_subcommand(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def hello(args: Any, ctx: common.Context) -> int:
        ctx.say(f"hello {args.name} on {ctx.settings.safe_url()}")
        return 0

    plugin: Any = types.ModuleType("mvalve_test_plugin")
    plugin.COMMAND = common.Command("say hello", lambda p: p.add_argument("name"), hello)
    foreign: Any = types.ModuleType("another_projects_module")  # no COMMAND
    monkeypatch.setitem(sys.modules, "mvalve_test_plugin", plugin)
    monkeypatch.setitem(sys.modules, "another_projects_module", foreign)
    plugins = {"hello": "mvalve_test_plugin", "gone": "no_such_mod", "x": "another_projects_module"}
    monkeypatch.setattr(commands, "PLUGINS", plugins)
    code, out, err = run(capsys, "--url", "memory://", "hello", "world")
    assert (code, out.strip()) == (0, "hello world on memory://"), err
    assert run(capsys, "gone")[0] == 2  # a missing plugin module is simply not there
    assert run(capsys, "x")[0] == 2  # nor is a module that declares no COMMAND


def test_mvalve_bench_is_there_from_a_checkout_only(tmp_path: Path) -> None:
    """The console script finds the repository's bench/ when run from the checkout."""
    mvalve = Path(sys.executable).with_name("mvalve")
    if not mvalve.exists():
        pytest.fail(f"no mvalve console script beside {sys.executable}: pip install -e .")
    checkout = Path(__file__).resolve().parents[2]
    here = subprocess.run([mvalve, "bench", "--help"], cwd=checkout, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert here.returncode == 0 and "--scenarios" in here.stdout, here.stderr
    elsewhere = subprocess.run([mvalve, "--help"], cwd=tmp_path, capture_output=True,
                               text=True, timeout=60)  # fmt: skip
    assert elsewhere.returncode == 0 and " bench " not in elsewhere.stdout
