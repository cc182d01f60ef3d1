from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mariadb_proc import MariaDBProcess


@pytest.fixture(scope="module")
def private_mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDBProcess]:
    """A mariadbd of our own, so that killing it disturbs no other test."""
    if not MariaDBProcess.available():
        if os.environ.get("CI"):
            pytest.fail("mariadbd / mariadb-install-db are not installed", pytrace=False)
        pytest.skip("mariadbd is not installed")
    server = MariaDBProcess(Path(tmp_path_factory.mktemp("mariadb")))
    server.install()
    server.start()
    try:
        yield server
    finally:
        server.stop()
