"""A TCP proxy in front of a memcached that can be told to stop answering (a network
partition), and a port whose connects hang, for the store's deadline tests.

No packet filter is available here (no nft/iptables), so the partition is made in
user space: the proxy stops forwarding in both directions. In `hold` mode (the
default) the bytes wait in the proxy and the socket buffers and are delivered when
it heals, as TCP retransmission would deliver them once a packet filter rule is
removed: a request cut off by its caller still reaches the server later, and its
reply comes back on the same connection, which is exactly how a reused connection
would read a stale reply. In `drop` mode the bytes are swallowed for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

HOST = "127.0.0.1"


class BlackholeProxy:
    """Forwards 127.0.0.1:`port` to `HOST:target`, until `blackhole()`.

    `connections` counts the connections accepted; `requests()` lists the command
    lines the clients sent (over all connections, each connection's in order).
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.connections = 0
        self._open = asyncio.Event()
        self._open.set()
        self._drop = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._sent: list[bytearray] = []  # client -> server bytes, per connection

    async def start(self) -> BlackholeProxy:
        self._server = await asyncio.start_server(self._accept, HOST, 0)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def label(self) -> str:
        return f"{HOST}:{self.port}"

    def blackhole(self, *, drop: bool = False) -> None:
        """Stop forwarding: nothing reaches the server, nothing comes back. New
        connections are accepted (the kernel completes the handshake) and go silent."""
        self._drop = drop
        self._open.clear()

    def heal(self) -> None:
        """Forward again (in hold mode, first whatever was held, in order)."""
        self._drop = False
        self._open.set()

    def requests(self) -> list[bytes]:
        lines: list[bytes] = []
        for sent in self._sent:
            lines.extend(line for line in bytes(sent).split(b"\r\n") if line)
        return lines

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        sent = bytearray()
        self._sent.append(sent)
        try:
            server_r, server_w = await asyncio.open_connection(HOST, self.target)
        except OSError:
            client_w.close()
            return
        self._writers += [client_w, server_w]
        for src, dst, record in ((client_r, server_w, sent), (server_r, client_w, None)):
            task = asyncio.create_task(self._pump(src, dst, record))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bytearray | None
    ) -> None:
        try:
            while data := await src.read(65536):
                if record is not None:
                    record += data
                if self._drop:
                    continue  # swallowed
                await self._open.wait()  # held until healed
                if self._drop:
                    continue
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()


@contextlib.contextmanager
def hanging_port() -> Iterator[int]:
    """A loopback port whose connects hang (as to a host behind a packet filter that
    drops SYNs): a listening socket with a backlog of 0, filled by one connection
    that is never accepted, so the kernel drops every later SYN."""
    listener = socket.socket()
    filler = socket.socket()
    try:
        listener.bind((HOST, 0))
        listener.listen(0)
        port: int = listener.getsockname()[1]
        filler.connect((HOST, port))
        yield port
    finally:
        filler.close()
        listener.close()
