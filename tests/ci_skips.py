"""In CI a skipped test is a failed one: CI proves that every test ran.

`.ci/run` sets `CI`; there a test that skips (a missing service, an optional extra
not installed, a dialect not built) fails with its skip reason. Outside CI the same
test still skips. Expected failures (xfail) are left alone. `tests/conftest.py`
imports the hook.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

__all__ = ["pytest_runtest_makereport"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and os.environ.get("CI"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every test must run: {reason}"
