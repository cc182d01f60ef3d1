"""With the store down, a reader waits (nothing unthrottled) unless it opted into
a local fallback store, which still throttles, per process."""

from __future__ import annotations

import socket

import mvalve_async
from mvalve_async import Message, Rate
from mvalve_async.stores.memory import MemoryStore
from tests.ledger import max_in_window


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port  # nothing listens there once the socket is closed


async def test_store_down_waits_without_fallback_and_throttles_with_it(tmp_path) -> None:
    store = f"memcached://127.0.0.1:{dead_port()}"
    async with mvalve_async.open(f"sqlite:///{tmp_path}/q.db", store) as pipe:
        await pipe.writer().insert_many([Message("d", i) for i in range(6)])
        waiting = pipe.reader(rate=Rate(2, per=0.5))
        assert await waiting.next(timeout=0.5) is None  # no unthrottled delivery
        await waiting.close()
        local = pipe.reader(rate=Rate(2, per=0.5), fallback_store=MemoryStore())
        got = [await local.next(timeout=5) for _ in range(6)]
        assert [m.content for m in got if m] == list(range(6))
        assert max_in_window([m.delivered_at for m in got if m], 0.5) <= 2
        await local.close()
