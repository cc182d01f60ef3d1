"""The backend registry: which class serves a dialect or a store kind.

`make_queue` and `make_store` turn a URL (or settings, or the environment) into a
backend through two explicit dicts, `QUEUES` and `STORES`. This module imports the
dialects and stores (lazily, in each factory, so that a user of one backend does
not pay for the others); they import the settings (urls.py), never this module.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .interfaces import Queue, Store
from .urls import (
    DEFAULT_SQLITE_PATH,
    QueueSettings,
    StoreSettings,
    parse_queue_url,
    parse_store_url,
)

__all__ = ["QUEUES", "STORES", "make_queue", "make_store"]


def _innodb(s: QueueSettings) -> Queue:
    from .queues.innodb import InnoDBQueue

    return InnoDBQueue(s)


def _q4m(s: QueueSettings) -> Queue:
    from .queues.q4m import Q4MQueue

    return Q4MQueue(s)


def _sqlite(s: QueueSettings) -> Queue:
    from .queues.sqlite import SQLiteQueue

    return SQLiteQueue(s)


def _memory_queue(s: QueueSettings) -> Queue:
    from .queues.memory import MemoryQueue

    return MemoryQueue(s)


def _memory_store(s: StoreSettings) -> Store:
    from .stores.memory import MemoryStore

    return MemoryStore()


def _memcached(s: StoreSettings) -> Store:
    from .stores.memcached import MemcachedStore

    return MemcachedStore(list(s.servers), namespace=s.namespace, pool_size=s.pool_size)


# The explicit registries: dialect / store kind -> factory. Imports are lazy so a
# user of one backend does not pay for the others.
QUEUES: dict[str, Callable[[QueueSettings], Queue]] = {
    "innodb": _innodb,
    "q4m": _q4m,
    "sqlite": _sqlite,
    "memory": _memory_queue,
}
STORES: dict[str, Callable[[StoreSettings], Store]] = {
    "memory": _memory_store,
    "memcached": _memcached,
}


def make_queue(url: str | QueueSettings | None = None) -> Queue:
    """A queue from a URL, settings, `MVALVE_URL`, or the embedded SQLite default."""
    if url is None:
        url = os.environ.get("MVALVE_URL") or f"sqlite:///{DEFAULT_SQLITE_PATH}"
    settings = url if isinstance(url, QueueSettings) else parse_queue_url(url)
    if len(settings.shards) > 1:
        from .queues.sharded import ShardedQueue

        factory = QUEUES[settings.dialect]
        children = [factory(s) for s in settings.shard_settings()]
        return ShardedQueue(children, settings=settings)
    return QUEUES[settings.dialect](settings)


def make_store(url: str | StoreSettings | None = None) -> Store:
    if url is None:
        url = os.environ.get("MVALVE_STORE_URL") or "memory://"
    settings = url if isinstance(url, StoreSettings) else parse_store_url(url)
    return STORES[settings.kind](settings)
