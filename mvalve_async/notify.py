"""In-process wake-ups: a writer's insert wakes the idle readers of the same pipe."""

from __future__ import annotations

import asyncio

__all__ = ["Notifier"]


class Notifier:
    def __init__(self) -> None:
        self._events: set[asyncio.Event] = set()

    def subscribe(self) -> asyncio.Event:
        event = asyncio.Event()
        self._events.add(event)
        return event

    def unsubscribe(self, event: asyncio.Event) -> None:
        self._events.discard(event)

    def notify(self) -> None:
        for event in self._events:
            event.set()
