"""In-process news of a queue: a writer tells the readers of its process what it
wrote, so that an idle reader wakes at once and knows where the new rows are
without waiting for its next scan of the queue. One `Notifier` per queue object
(`news_for`), whoever built the writers and readers."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterable

__all__ = ["Notifier", "news_for"]


class Notifier:
    def __init__(self) -> None:
        self._events: set[asyncio.Event] = set()
        self._hints: dict[str, float] = {}  # destination -> when its new row is due (0: now)
        self._emergency = False

    def subscribe(self) -> asyncio.Event:
        event = asyncio.Event()
        self._events.add(event)
        return event

    def unsubscribe(self, event: asyncio.Event) -> None:
        self._events.discard(event)

    def notify(
        self, destinations: Iterable[tuple[str, float]] = (), *, emergency: bool = False
    ) -> None:
        """Rows were written: `(destination, due)` pairs, `emergency` rows."""
        hints = self._hints
        for destination, due in destinations:
            old = hints.get(destination)
            hints[destination] = due if old is None else min(old, due)
        self._emergency = self._emergency or emergency
        for event in self._events:
            event.set()

    def take(self) -> tuple[dict[str, float], bool]:
        """The hints gathered since the last call (for the process's directory)."""
        hints, emergency = self._hints, self._emergency
        self._hints, self._emergency = {}, False
        return hints, emergency


_NEWS: weakref.WeakKeyDictionary[object, Notifier] = weakref.WeakKeyDictionary()


def news_for(queue: object) -> Notifier:
    """The notifier of `queue` (one per queue object in this process)."""
    news = _NEWS.get(queue)
    if news is None:
        news = _NEWS[queue] = Notifier()
    return news
