"""In CI a skipped test is a failed one: CI proves that every test ran.

`.ci/run` sets `CI`; there a test that skips (a missing service, an optional extra
not installed, a dialect not built) fails with its skip reason, and a module that
skips whole at import (`allow_module_level=True`) fails the run. Outside CI the same
tests still skip. Expected failures (xfail) are left alone. `tests/conftest.py`
imports these hooks.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

__all__ = ["pytest_runtest_makereport", "pytest_sessionfinish", "pytest_terminal_summary"]


def _in_ci() -> bool:
    return bool(os.environ.get("CI"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and _in_ci():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every test must run: {reason}"


def _skipped(config: pytest.Config) -> list[Any]:
    """What is still counted as skipped (whole modules skipped at collection)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    return list(reporter.stats.get("skipped", [])) if reporter is not None else []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _in_ci() and _skipped(session.config) and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    skipped = _skipped(config)
    if _in_ci() and skipped:
        terminalreporter.section("skipped in CI")
        for report in skipped:
            where = getattr(report, "nodeid", "") or "?"
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
            terminalreporter.write_line(f"{where}: {reason}")
        terminalreporter.write_line("CI fails on any skip: every test must run")
