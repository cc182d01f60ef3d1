"""`mvalve_async.open()`: what it logs about the defaults it picked, and when."""

from __future__ import annotations

import logging

import pytest

import mvalve_async

STORE_NOTE = "no store URL given: throttle state is kept in memory, for this process only"


def _notes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mvalve_async.pipe"]


async def test_the_memory_store_note_waits_for_the_first_reader(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MVALVE_STORE_URL", raising=False)
    caplog.set_level(logging.INFO, logger="mvalve_async")
    async with mvalve_async.open("memory://") as pipe:
        pipe.writer()
        assert STORE_NOTE not in _notes(caplog)  # a writer needs no store
        await pipe.reader().close()
        await pipe.reader().close()
    assert _notes(caplog).count(STORE_NOTE) == 1  # once, for the first reader


@pytest.mark.parametrize("how", ["argument", "environment"])
async def test_no_memory_store_note_when_a_store_was_named(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    monkeypatch.delenv("MVALVE_STORE_URL", raising=False)
    store = "memory://"
    if how == "environment":
        monkeypatch.setenv("MVALVE_STORE_URL", store)
    caplog.set_level(logging.INFO, logger="mvalve_async")
    async with mvalve_async.open("memory://", store if how == "argument" else None) as pipe:
        await pipe.reader().close()
    assert STORE_NOTE not in _notes(caplog)
