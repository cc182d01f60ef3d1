"""tests/ci_skips.py: with CI set, a skip fails the run; without, it stays a skip."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

SUITE = """
import pytest

def test_skips_in_its_body():
    pytest.skip("no server here")

@pytest.mark.skip(reason="marked")
def test_marked_skip():
    pass

@pytest.mark.xfail(reason="a known bug")
def test_expected_failure():
    assert False

def test_passes():
    pass
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makeconftest("from tests.ci_skips import *  # noqa: F403")
    pytester.makepyfile(test_suite=SUITE)
    return pytester


def test_in_ci_every_skip_fails_with_its_reason(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")
    result = suite.runpytest("-p", "no:cacheprovider")
    # a skip in the body fails the test; a skip mark fails its setup (an error)
    result.assert_outcomes(passed=1, failed=1, errors=1, xfailed=1)
    result.stdout.fnmatch_lines(["*skipped in CI, where every test must run*no server here*"])
    assert result.ret != 0


def test_in_ci_a_module_skipped_at_import_fails_the_run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makeconftest("from tests.ci_skips import *  # noqa: F403")
    pytester.makepyfile(
        test_extra="import pytest\npytest.skip('needs an extra', allow_module_level=True)\n",
        test_other="def test_passes():\n    pass\n",
    )
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*skipped in CI*", "*needs an extra*"])
    monkeypatch.delenv("CI")
    assert pytester.runpytest("-p", "no:cacheprovider").ret == pytest.ExitCode.OK


def test_outside_ci_skips_stay_skips(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CI", raising=False)
    result = suite.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=2, xfailed=1)
    assert result.ret == 0
