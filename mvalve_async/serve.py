"""`Pipe.serve`: N workers, each a reader, for background services.

`serve` knows nothing of the pipe: it is given a function that makes a reader (the
pipe's `reader` with the options the caller chose), so pipe.py imports this module
and not the other way round."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import cast

from .message import Message
from .reader import Reader

__all__ = ["Handler", "serve"]

# `handler(msg)`, or with `with_reader=True` `handler(msg, reader)`: the worker's own
# reader, for `reader.pause(...)` on a 429 and explicit `retry` / `reject` / `ack`.
Handler = Callable[[Message], Awaitable[object]] | Callable[[Message, Reader], Awaitable[object]]

log = logging.getLogger(__name__)


async def serve(
    readers: Callable[[], Reader],
    handler: Handler,
    *,
    concurrency: int = 1,
    retry_delay: float = 1.0,
    stop: asyncio.Event | None = None,
    poll: float = 0.5,
    with_reader: bool = False,
) -> None:
    """Run `handler` on every message with `concurrency` workers, each with its own
    reader made by `readers()` (see `Pipe.serve`)."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    stop = stop or asyncio.Event()
    call = cast("Callable[..., Awaitable[object]]", handler)

    async def worker(n: int) -> None:
        reader = readers()
        try:
            while not stop.is_set():
                msg = await reader.next(timeout=poll)
                if msg is None:
                    continue
                try:
                    await (call(msg, reader) if with_reader else call(msg))
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception(
                        "handler failed on %s; retrying in %.1fs", msg.id, retry_delay,
                        extra={"destination": msg.destination, "message_id": msg.id},
                    )  # fmt: skip
                    await reader.retry(msg, retry_delay)
        except asyncio.CancelledError:
            # The message being handled goes back to the queue.
            with contextlib.suppress(Exception):
                await asyncio.shield(reader.retry())
            raise
        finally:
            await asyncio.shield(reader.close())

    async with asyncio.TaskGroup() as group:
        for n in range(concurrency):
            group.create_task(worker(n))
