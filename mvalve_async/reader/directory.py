"""The destinations of one queue that have rows, as this process knows them.

Claims go per destination (the valve decides per destination before any row is
leased), so readers need to know which destinations have rows without walking
the rows: a destination's backlog, however large, is one entry here. The
directory is shared by the queue's readers in this process and kept in the order
the destinations were last served (least recently served first): readers take
destinations in that order, so destinations with due work take turns.

It learns from:
- `Queue.scan`: a full scan at first (every destination with rows), then cheap
  incremental ones (rows written, or timed rows come due, since the last scan's
  mark) every `max_age` the reader asks for (or 10 times as long as the last
  scan took), and a full one again every `FULL_EVERY` seconds (or 20 times as
  long as the last one took): rows that come back by lease expiry, or whose
  insert committed behind a later one, are found then;
- writers of the same process (`Notifier`): at once;
- claims: a destination whose claim came back short has no claimable row left
  (its rows in flight come back by release, which tells the directory too).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import time
import weakref
from collections.abc import Callable, Container, Iterator, Mapping
from typing import Any

from ..interfaces import Found, Queue
from ..notify import Notifier, news_for
from ..tuning import FULL_EVERY, SCAN_COST_FACTOR

__all__ = ["Directory", "directory_for"]

log = logging.getLogger(__name__)


class Directory:
    def __init__(self, queue: Queue, news: Notifier) -> None:
        self.queue = queue
        self.news = news
        self.entries: collections.OrderedDict[str, Found] = collections.OrderedDict()
        self.emergency = False  # emergency rows may be claimable
        self.next_due: float | None = None  # earliest future ready in the timed lane
        self.scans = 0
        self._mark: Any = None
        self._scanned = float("-inf")  # monotonic time of the last scan
        self._full_at = float("-inf")
        self._full_every = FULL_EVERY
        self._cost = 0.0  # seconds the last scan took
        self._lock = asyncio.Lock()
        # destination -> (nothing before, drop): what the readers of this process
        # learned of pauses, durations and emergency windows, so that each of them
        # holds back at once what it has in hand (others learn at their next claim)
        self._blocks: dict[str, tuple[float, bool]] = {}

    def block(self, destination: str, until: float, drop: bool = False) -> None:
        """Nothing of `destination` before `until` (`drop`: its messages go to the
        dead letters until then)."""
        old = self._blocks.get(destination)
        if old is None or until > old[0] or drop:
            self._blocks[destination] = (until, drop)

    def unblock(self, destination: str) -> None:
        self._blocks.pop(destination, None)

    def blocked(self, destination: str, now: float) -> tuple[float, bool] | None:
        """(until, drop) while `destination` is held back, else None."""
        found = self._blocks.get(destination)
        if found is None:
            return None
        if found[0] <= now:
            del self._blocks[destination]
            return None
        return found

    def __len__(self) -> int:
        return len(self.entries)

    def absorb_news(self) -> None:
        hints, emergency = self.news.take()
        for destination, due in hints.items():
            self.put(destination, due)
        self.emergency = self.emergency or emergency

    async def refresh(self, now: float, max_age: float) -> None:
        """Scan the queue if the last scan is older than `max_age` seconds (one scan
        at a time: concurrent callers share it)."""
        self.absorb_news()
        max_age = max(max_age, SCAN_COST_FACTOR * self._cost)
        if time.monotonic() - self._scanned < max_age:
            return
        async with self._lock:
            started = time.monotonic()
            if started - self._scanned < max_age:
                return
            full = self._mark is None or started - self._full_at >= self._full_every
            scan = await self.queue.scan(now, None if full else self._mark)
            self.scans += 1
            self._scanned = time.monotonic()
            self._cost = self._scanned - started
            if scan.full:
                self._full_at = self._scanned
                self._full_every = max(FULL_EVERY, 20 * self._cost)
                for destination in [d for d in self.entries if d not in scan.found]:
                    del self.entries[destination]
            known = [d for d in scan.found if d in self.entries]
            new = [d for d in scan.found if d not in self.entries]
            # Processes scan the same destinations in the same (sorted) order: each
            # takes them in its own order, or every reader of every process would
            # go for the same destination at the same moment (one gets its hold,
            # the others a wasted checkout), round after round.
            random.shuffle(new)
            for destination in known + new:
                found = scan.found[destination]
                self.put(destination, found.ready, found.rows)
            self._mark = scan.mark
            self.emergency = scan.emergency
            self.next_due = scan.next_due

    def put(self, destination: str, ready: float = 0.0, rows: int = -1) -> None:
        """`destination` has rows, claimable from `ready` (about `rows` of them)."""
        entry = self.entries.get(destination)
        if entry is None:
            self.entries[destination] = Found(rows, ready)
            return
        entry.ready = min(entry.ready, ready)
        if rows > 0:
            entry.rows = entry.rows + rows if entry.rows > 0 else rows

    def pick(self, now: float, skip: Callable[[str], bool]) -> Iterator[tuple[str, Found]]:
        """Destinations with rows claimable now, least recently served first."""
        for destination, entry in self.entries.items():
            if entry.ready <= now and not skip(destination):
                yield destination, entry

    def served(self, destination: str, claimed: int, asked: int) -> None:
        """A claim asked `asked` rows of `destination` and got `claimed`: it goes to
        the end of the line; when short, it has no claimable row left."""
        entry = self.entries.get(destination)
        if entry is None:
            return
        if claimed < asked:
            del self.entries[destination]
            return
        self.entries.move_to_end(destination)
        if entry.rows > 0:
            entry.rows = max(1, entry.rows - claimed)

    def next_time(
        self, now: float, holding: Container[str], tries: Mapping[str, float]
    ) -> float | None:
        """The earliest time a destination becomes claimable by a reader that holds a
        group of each of `holding` (their ends come with a hand-out, which wakes it
        anyway) and may try `tries[d]` again from that time (None: none known).

        Runs each time a reader waits, over every destination with rows: one loop
        with no call per destination, that stops at the first claimable now."""
        best = math.inf
        blocks = self._blocks
        for destination, entry in self.entries.items():
            if destination in holding:
                continue
            at = entry.ready
            again = tries.get(destination, 0.0)
            if again > at:
                at = again
            block = blocks.get(destination)
            if block is not None and block[0] > at:
                at = block[0]
            if at < best:
                best = at
                if at <= now:
                    return at
        if self.next_due is not None and now < self.next_due < best:  # else: by a scan
            best = self.next_due
        return None if best == math.inf else best

    def __repr__(self) -> str:
        return f"Directory({self.queue!r}, {len(self.entries)} destinations)"


_DIRECTORIES: weakref.WeakKeyDictionary[Queue, Directory] = weakref.WeakKeyDictionary()


def directory_for(queue: Queue) -> Directory:
    """The directory of `queue` in this process (one per queue object)."""
    directory = _DIRECTORIES.get(queue)
    if directory is None:
        directory = _DIRECTORIES[queue] = Directory(queue, news_for(queue))
    return directory
