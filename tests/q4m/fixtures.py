"""Pytest fixtures for the Q4M emulator; import them into a conftest with
``from tests.q4m.fixtures import q4m_server``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from tests.q4m.emulator import Q4MServer


@pytest_asyncio.fixture
async def q4m_server() -> AsyncIterator[Q4MServer]:
    """A started emulator on a free 127.0.0.1 port (``.port``, ``.url``);
    any user/password is accepted; stopped, with every connection dropped,
    after the test."""
    server = Q4MServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
