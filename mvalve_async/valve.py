"""The valve: per-destination decisions through the shared store.

Pure scheduling lives in schedule.py; this module binds it to a `Store`
(atomic record updates, retried with back-off while the store is down: the
valve never lets a message through unthrottled).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from .errors import StoreError
from .interfaces import Store
from .schedule import Decision, EmergencyPolicy, Rate, Record, admit
from .schedule import pause as _pause
from .schedule import resume as _resume

__all__ = ["Valve"]

log = logging.getLogger(__name__)


# Records must outlive every slot they hold: a day covers any backlog this library
# is meant for, and stays under memcached's 30-day "absolute time" threshold.
RECORD_TTL = 86400


def key_for(destination: str) -> str:
    return "d:" + destination


class Valve:
    def __init__(
        self,
        store: Store,
        *,
        rate: Rate | None = None,
        rates: Mapping[str, Rate | None] | None = None,
        policy: EmergencyPolicy | str = EmergencyPolicy.DROP,
        fifo_grace: float = 1.0,
        retry_max: float = 2.0,
    ) -> None:
        self.store = store
        self.rate = rate
        self.rates = dict(rates or {})
        self.policy = EmergencyPolicy(policy)
        self.fifo_grace = fifo_grace
        self.retry_max = retry_max

    def rate_for(self, destination: str) -> Rate | None:
        return self.rates.get(destination, self.rate)

    async def decide(
        self,
        destination: str,
        *,
        duration: float | None,
        emergency: bool,
        reserved: bool,
        deadline: float | None = None,
    ) -> Decision | None:
        """One atomic admission. While the store is unreachable, waits and retries
        (logged); returns None if `deadline` (loop time) passes first."""
        rate = self.rate_for(destination)
        policy, grace = self.policy, self.fifo_grace

        def step(raw: bytes | None) -> tuple[bytes | None, Decision]:
            rec = Record.loads(raw)
            decision = admit(
                rec, time.time(), rate, duration=duration, emergency=emergency,
                reserved=reserved, policy=policy, fifo_grace=grace,
            )  # fmt: skip
            return rec.dumps(), decision

        loop = asyncio.get_running_loop()
        delay = 0.05
        while True:
            try:
                return await self.store.update(key_for(destination), step, ttl=RECORD_TTL)
            except StoreError as exc:
                log.warning(
                    "state store unavailable (%s); retrying in %.2fs", exc, delay,
                    extra={"destination": destination},
                )  # fmt: skip
                if deadline is not None and loop.time() + delay > deadline:
                    return None
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max)

    async def pause(self, destination: str, seconds: float) -> None:
        now = time.time()

        def fn(raw: bytes | None) -> tuple[bytes | None, None]:
            rec = Record.loads(raw)
            _pause(rec, now, seconds)
            return rec.dumps(), None

        await self.store.update(key_for(destination), fn, ttl=RECORD_TTL)

    async def resume(self, destination: str) -> None:
        def fn(raw: bytes | None) -> tuple[bytes | None, None]:
            rec = Record.loads(raw)
            _resume(rec)
            return rec.dumps(), None

        await self.store.update(key_for(destination), fn, ttl=RECORD_TTL)

    async def record(self, destination: str) -> Record:
        return Record.loads(await self.store.get(key_for(destination)))
