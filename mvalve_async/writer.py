"""Writers validate and encode messages, then insert them into their lane."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TypedDict

from .events import Emitter, Observer
from .interfaces import Lane, Queue, Row
from .message import DEFAULT_MAX_DESTINATION, DEFAULT_MAX_SIZE, Message, encode
from .message import validate_destination as _validate_destination
from .notify import news_for

__all__ = ["Writer", "WriterOptions"]

log = logging.getLogger(__name__)


class WriterOptions(TypedDict, total=False):
    """`Writer`'s keyword options, for `Pipe.writer` (types checked; those not given
    take `Writer`'s defaults). Keep in step with `Writer.__init__`."""

    max_size: int
    max_destination: int
    observers: Sequence[Observer]


class Writer:
    """Inserts messages. Emergency messages take the emergency lane, messages
    with `deliver_at`/`delay` the timed lane, the rest the normal lane. Every
    message is validated and encoded before anything is written: a batch with
    one bad message writes nothing."""

    def __init__(
        self,
        queue: Queue,
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        max_destination: int = DEFAULT_MAX_DESTINATION,
        observers: Sequence[Observer] = (),
    ) -> None:
        self.queue = queue
        self.max_size = max_size
        self.max_destination = max_destination
        self._news = news_for(queue)
        self._emit = Emitter(observers)

    def _row(self, message: Message, now: float) -> tuple[Lane, Row]:
        if not isinstance(message, Message):
            raise TypeError(f"expected a Message, got {type(message).__name__}")
        _validate_destination(message.destination, self.max_destination)
        blob = encode(message, self.max_size)
        if message.emergency:
            return Lane.EMERGENCY, Row(message.destination, blob)
        ready = message.ready_at(now)
        if ready is not None:
            return Lane.TIMED, Row(message.destination, blob, ready)
        return Lane.NORMAL, Row(message.destination, blob)

    async def insert(self, message: Message) -> str:
        """Insert one message; returns its id."""
        lane, row = self._row(message, self.queue.clock.now())
        await self.queue.insert(lane, [row])
        self._emit("enqueue", message.destination)
        log.debug(
            "inserted %s for %s into %s",
            message.id,
            message.destination,
            lane,
            extra={"destination": message.destination, "message_id": message.id},
        )
        self._news.notify([(row.destination, row.ready or 0.0)], emergency=lane is Lane.EMERGENCY)
        return message.id

    async def insert_many(self, messages: Iterable[Message]) -> list[str]:
        """Insert many messages in one statement per lane; all are validated first."""
        now = self.queue.clock.now()
        batch = list(messages)
        by_lane: dict[Lane, list[Row]] = {}
        for message in batch:
            lane, row = self._row(message, now)
            by_lane.setdefault(lane, []).append(row)
        for lane, rows in by_lane.items():
            await self.queue.insert(lane, rows)
            for row in rows:
                self._emit("enqueue", row.destination)
        if batch:
            self._news.notify(
                [(r.destination, r.ready or 0.0) for rows in by_lane.values() for r in rows],
                emergency=Lane.EMERGENCY in by_lane,
            )
        return [m.id for m in batch]

    async def defer(self, message: Message, delay: float) -> str:
        """The Perl name: insert `message` to be delivered `delay` seconds from now."""
        message.delay, message.deliver_at = delay, None
        Message.__post_init__(message)  # validates delay
        return await self.insert(message)

    async def clear_all(self) -> int:
        """Delete every queued message (not dead letters); returns how many."""
        return await self.queue.purge()

    async def close(self) -> None:
        """Writers hold nothing of their own; the pipe owns the pool."""

    async def __aenter__(self) -> Writer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"Writer(queue={self.queue!r})"
