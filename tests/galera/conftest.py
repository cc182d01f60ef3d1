"""The `galera` fixture: a real three-node MariaDB Galera cluster on loopback, started
once per session (about 10-15 s) and removed at the end (tests/galera_proc.py).

Where galera-4, mariadbd or rsync are missing, the tests here skip, except in CI,
where they fail (.ci/run installs them). A cluster that is installed but cannot
start always fails."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.galera_proc import GaleraCluster, available


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.galera)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def galera_cluster() -> Iterator[GaleraCluster]:
    missing = available()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"Galera: {missing} (CI must install it: see .ci/run)", pytrace=False)
        pytest.skip(f"Galera: {missing}")
    # Not under pytest's tmp_path: the nodes run as `mysql`, which must reach it.
    workdir = Path(tempfile.mkdtemp(prefix="mvalve-galera-"))
    cluster = GaleraCluster(workdir)
    try:
        cluster.start()
    except BaseException as exc:
        cluster.remove()
        pytest.fail(f"the Galera cluster did not start: {exc}", pytrace=False)
    print(f"\nGalera cluster started in {cluster.start_seconds:.1f} s ({cluster.url()})")
    try:
        yield cluster
    finally:
        cluster.remove()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def galera(galera_cluster: GaleraCluster) -> GaleraCluster:
    """The session's cluster with every node up and Synced (a node a previous test
    killed is restarted first)."""
    for node in galera_cluster.nodes:
        if not node.alive:
            node.restart()
    galera_cluster.wait_synced(60)
    return galera_cluster
