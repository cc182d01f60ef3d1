"""`Pipe.serve`: N workers, each a reader, for background services."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .message import Message

if TYPE_CHECKING:
    from .pipe import Pipe

__all__ = ["serve"]

log = logging.getLogger(__name__)


async def serve(
    pipe: Pipe,
    handler: Callable[[Message], Awaitable[object]],
    *,
    concurrency: int = 1,
    retry_delay: float = 1.0,
    stop: asyncio.Event | None = None,
    poll: float = 0.5,
    **reader_options: Any,
) -> None:
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    stop = stop or asyncio.Event()

    async def worker(n: int) -> None:
        reader = pipe.reader(**reader_options)
        try:
            while not stop.is_set():
                msg = await reader.next(timeout=poll)
                if msg is None:
                    continue
                try:
                    await handler(msg)
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
