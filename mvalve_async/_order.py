"""Per-destination order across readers, kept in a destination's record: the
claims readers announce and the reservations of deferred messages, so that a
younger message neither goes out before an older one held elsewhere nor keeps
an earlier slot reserved after an older one comes (see schedule.admit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .schedule import Record

__all__ = ["ORDER_WAIT", "PENDING_MAX", "claimed", "older_due", "take_older_place"]

# Reservations (and claims) a record keeps for order: an older message decided after
# younger ones can only take a slot the record still lists. 128 left the last
# windows of a 200-per-destination backlog unordered (3 % inversions in the bench).
PENDING_MAX = 256
# An older message not handed out this long after its slot (or claim) is presumed
# lost (its reader died or returned it): nothing waits for it any more.
ORDER_WAIT = 1.0


def older_due(rec: Record, now: float, seq: int) -> int:
    """An older message of this destination is due (its reserved slot has come, or
    another reader announced its claim) and not handed out yet. After ORDER_WAIT
    it is presumed lost (its reader died or returned it) and no longer waited for.
    Returns how many there are."""
    due = {q for t, q in rec.pending if q < seq and now - ORDER_WAIT < t <= now}
    return len(due | {q for t, q in rec.claims if q < seq and t > now - ORDER_WAIT})


def claimed(rec: Record, now: float, seqs: list[int]) -> bool:
    """A reader claimed these messages (by seq): until each is admitted, younger
    messages claimed by other readers wait for it instead of overtaking it (what
    inverted the first burst of a destination shared by several readers). Returns
    False when nothing changed."""
    have = {q for _, q in rec.claims}
    new = [[now, float(q)] for q in seqs if q not in have]
    if not new:
        return False
    live = [c for c in rec.claims if c[0] > now - ORDER_WAIT]  # the expired ones go
    rec.claims = sorted(live + new, key=lambda c: c[1])[:PENDING_MAX]
    return True


def take_older_place(
    rec: Record, now: float, slot: float, seq: int
) -> tuple[float, tuple[tuple[int, float, float], ...]]:
    """Readers claiming at the same moment admit a destination's messages in any
    order, so an older message may be reserved after a younger one. It then takes
    the earliest slot among the younger pending ones and each of those moves to
    the next slot, in insertion order: the set of slots (hence the rate) is the
    same, the order is FIFO again. Returns this message's slot and the moves."""
    # Reservations not handed out yet (a due one may be waiting for an older one):
    # a younger one's slot, even a due one, goes to this older message.
    live = [p for p in rec.pending if p[0] > now - ORDER_WAIT and p[1] != seq]
    younger = [p for p in live if p[1] > seq]
    moves: list[tuple[int, float, float]] = []
    mine = slot
    if younger:
        times = sorted([t for t, _ in younger] + [slot])
        mine = times[0]
        old = {int(q): t for t, q in younger}
        for q, t in zip(sorted(old), times[1:], strict=True):
            if t != old[q]:
                moves.append((q, old[q], t))
        live = [p for p in live if p[1] <= seq]
        live += [[t, float(q)] for q, t in zip(sorted(old), times[1:], strict=True)]
    live.append([mine, float(seq)])
    live.sort()
    rec.pending = live[:PENDING_MAX]  # the imminent ones matter: a far backlog reorders later
    return mine, tuple(moves)
