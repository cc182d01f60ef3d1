"""Observers: counters of what happens to messages, for the stats log and metrics.

An observer's `event` is called synchronously on the hot path: it must only count
(aggregate in memory) and flush on its own schedule. An observer that flushes in a
background task also declares `Lifecycle` (`start` and `close`): a pipe starts it
when it connects and closes it after its readers. Actions: enqueue, dequeue,
defer (a reader found a destination with messages held back by its rate, a pause,
a duration or an emergency window: once per claim that found it so; its rows stay
where they are), drop (dead because of an emergency), dead, ack, abort (retried).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = ["ACTIONS", "Emitter", "Lifecycle", "Observer"]

log = logging.getLogger(__name__)

# Compatibility surface: the stats log stores these names (its `action` column, read
# by `mvalve statslog --action`); renaming one needs a migration of its rows.
ACTIONS = ("enqueue", "dequeue", "defer", "drop", "dead", "ack", "abort")


@runtime_checkable
class Observer(Protocol):
    def event(self, action: str, destination: str, count: int = 1) -> None: ...


@runtime_checkable
class Lifecycle(Protocol):
    """An observer with work of its own in the background (`StatsLog`'s flush loop).
    `Pipe` starts it when it connects and closes it when it closes, after its
    readers (whose last acks count)."""

    async def start(self) -> object: ...

    async def close(self) -> None: ...


class Emitter:
    """Calls every observer; one failing observer never breaks delivery."""

    __slots__ = ("observers",)

    def __init__(self, observers: Sequence[Observer] = ()) -> None:
        self.observers = tuple(observers)

    def __call__(self, action: str, destination: str, count: int = 1) -> None:
        for observer in self.observers:
            try:
                observer.event(action, destination, count)
            except Exception:
                log.exception("observer %r failed on %s", observer, action)
