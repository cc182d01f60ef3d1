"""`Pipe.serve`: N workers, each a reader, for background services.

A worker never ends on a transient queue error: a `QueueError` (a lost or failed-over
node, a deadlock that outlived its retries, an ack or a retry that did not reach the
server) raised by `reader.next()` or by the retry after a failed handler is logged,
and the worker goes on after a back-off (BACKOFF, doubling up to BACKOFF_MAX, reset
by the next call that succeeds). Nothing is lost by it: acks that failed are kept
by the reader and sent again; a message whose retry failed stays leased and comes
back when its lease ends. A `SchemaError` (the tables are missing) and any other
exception (a bug) end `serve()`.

`serve` knows nothing of the pipe: it is given a function that makes a reader (the
pipe's `reader` with the options the caller chose), so pipe.py imports this module
and not the other way round."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import cast

from .errors import QueueError, SchemaError
from .message import Message
from .reader import Reader

__all__ = ["Handler", "serve"]

# `handler(msg)`, or with `with_reader=True` `handler(msg, reader)`: the worker's own
# reader, for `reader.pause(...)` on a 429 and explicit `retry` / `reject` / `ack`.
Handler = Callable[[Message], Awaitable[object]] | Callable[[Message, Reader], Awaitable[object]]

log = logging.getLogger(__name__)

BACKOFF = 0.05  # seconds a worker waits after its first queue error in a row
BACKOFF_MAX = 2.0


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

    async def pause(n: int, what: str, exc: QueueError, backoff: float) -> float:
        """Log a transient queue error, wait `backoff` (or until stop); the next one."""
        log.warning(
            "worker %d: %s failed (%s: %s); going on in %.2fs",
            n, what, type(exc).__name__, exc, backoff,
        )  # fmt: skip
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(backoff):
                await stop.wait()
        return min(backoff * 2, BACKOFF_MAX)

    async def worker(n: int) -> None:
        reader = readers()
        backoff = BACKOFF
        try:
            while not stop.is_set():
                try:
                    msg = await reader.next(timeout=poll)
                except SchemaError:
                    raise
                except QueueError as exc:
                    backoff = await pause(n, "next()", exc, backoff)
                    continue
                backoff = BACKOFF
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
                    try:
                        await reader.retry(msg, retry_delay)
                    except SchemaError:
                        raise
                    except QueueError as exc:
                        # the message stays leased: it comes back when its lease ends
                        backoff = await pause(n, f"retry of {msg.id}", exc, backoff)
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
