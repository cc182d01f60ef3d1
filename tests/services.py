"""Where the test services are, and the rule: in CI a missing service fails loudly."""

from __future__ import annotations

import os
import socket

import pytest

MYSQL_URL = os.environ.get("MVALVE_TEST_MYSQL_URL", "mysql+innodb://root@127.0.0.1:3306/test")
MEMCACHED_URL = os.environ.get("MVALVE_TEST_MEMCACHED_URL", "memcached://127.0.0.1:11211")


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require(name: str, host: str, port: int) -> None:
    if reachable(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must start it: see .ci/run)", pytrace=False)
    pytest.skip(message)


def require_mysql() -> None:
    require("MariaDB/MySQL", "127.0.0.1", 3306)


def require_memcached() -> None:
    require("memcached", "127.0.0.1", 11211)
