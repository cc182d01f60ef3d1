"""`open()`: one queue (one pool) and one store, shared by the pipe's writers and readers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Unpack

from .events import Lifecycle, Observer
from .interfaces import Queue, Store
from .reader import Reader, ReaderOptions
from .registry import make_queue, make_store
from .serve import Handler, serve
from .urls import QueueSettings, StoreSettings
from .writer import Writer, WriterOptions

__all__ = ["Pipe", "open"]

log = logging.getLogger(__name__)


class Pipe:
    """A queue and a store. Use as `async with mvalve_async.open(...) as pipe`."""

    def __init__(
        self,
        queue: Queue,
        store: Store,
        *,
        create: bool | None = None,
        observers: Sequence[Observer] = (),
    ) -> None:
        self.queue = queue
        self.observers = list(observers)
        self.store = store
        self._create = create if create is not None else queue.traits.one_host
        self._readers: list[Reader] = []
        self._connected = False
        self._store_note: str | None = None  # logged when the first reader is made

    async def connect(self) -> Pipe:
        if not self._connected:
            await self.queue.connect()
            if self._create:
                await self.queue.create_schema()
            for observer in self.observers:  # e.g. a StatsLog: its flush loop
                if isinstance(observer, Lifecycle):
                    await observer.start()
            self._connected = True
        return self

    def writer(self, **options: Unpack[WriterOptions]) -> Writer:
        """A `Writer` on the pipe's queue; `options` are `Writer`'s (the URL's
        `max_destination` and the pipe's observers unless given)."""
        options.setdefault("max_destination", self.queue.settings.max_destination)
        options.setdefault("observers", self.observers)
        return Writer(self.queue, **options)

    def reader(self, **options: Unpack[ReaderOptions]) -> Reader:
        """A `Reader` on the pipe's queue and store; `options` are `Reader`'s (`rate`,
        `rates`, `emergency_policy`, `lease`, `batch`, ...; the URL's
        `max_destination` and the pipe's observers unless given)."""
        if self._store_note is not None:  # writers need no store: say it to readers only
            log.info(self._store_note)
            self._store_note = None
        options.setdefault("max_destination", self.queue.settings.max_destination)
        options.setdefault("observers", self.observers)
        reader = Reader(self.queue, self.store, **options)
        self._readers = [r for r in self._readers if not r.closed]  # no leak of old ones
        self._readers.append(reader)
        return reader

    async def serve(
        self,
        handler: Handler,
        *,
        concurrency: int = 1,
        retry_delay: float = 1.0,
        stop: asyncio.Event | None = None,
        poll: float = 0.5,
        with_reader: bool = False,
        **reader_options: Unpack[ReaderOptions],
    ) -> None:
        """Run `handler` on every message with `concurrency` workers, each with its
        own reader. A handler that raises gets its message retried after
        `retry_delay`. Returns when `stop` is set (leased messages finish or go
        back); cancelling it returns the messages being handled to the queue.
        With `with_reader=True` the handler is called as `handler(msg, reader)`,
        to `await reader.pause(msg.destination, retry_after)` on a 429, or settle
        the message itself (`reader.retry(msg, delay)`, `reject`, `ack`). `poll`:
        the seconds each worker's `next()` waits before it looks at `stop` again."""
        await serve(lambda: self.reader(**reader_options), handler, concurrency=concurrency,
                    retry_delay=retry_delay, stop=stop, poll=poll,
                    with_reader=with_reader)  # fmt: skip

    async def close(self) -> None:
        for reader in self._readers:
            with contextlib.suppress(Exception):
                await reader.close()
        self._readers.clear()
        for observer in self.observers:  # after the readers: their last acks count
            if isinstance(observer, Lifecycle):
                with contextlib.suppress(Exception):
                    await observer.close()
        await self.queue.close()
        await self.store.close()
        self._connected = False

    async def __aenter__(self) -> Pipe:
        try:
            return await self.connect()
        except BaseException:
            await self.close()
            raise

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"Pipe(queue={self.queue!r}, store={self.store!r})"


def open(
    url: str | QueueSettings | None = None,
    store: str | StoreSettings | None = None,
    *,
    create: bool | None = None,
    observers: Sequence[Observer] = (),
) -> Pipe:
    """A pipe on `url` (or `MVALVE_URL`, or an embedded SQLite file) with the state
    store `store` (or `MVALVE_STORE_URL`, or memory). Tables are created
    automatically for the embedded dialects; pass `create=True` for MySQL (or
    run `mvalve create`, which needs DDL rights that readers and writers do not)."""
    import os

    if url is None and not os.environ.get("MVALVE_URL"):
        log.info("no queue URL given: using the embedded SQLite default (mvalve.sqlite3)")
    pipe = Pipe(make_queue(url), make_store(store), create=create, observers=observers)
    if store is None and not os.environ.get("MVALVE_STORE_URL"):
        pipe._store_note = (
            "no store URL given: throttle state is kept in memory, for this process only"
        )
    return pipe
