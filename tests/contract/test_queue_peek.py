"""`Queue.peek`: a read-only look at queued rows (for `mvalve peek`). It must not
change what a claim returns, nor the rows' leases or delivery counts."""

from __future__ import annotations

import pytest

from mvalve_async.interfaces import Lane, Queue, Row, Want

KEYS = {"id", "lane", "table", "destination", "ready", "deliveries", "lease_until", "blob"}


def _peek_or_skip(queue: Queue) -> None:
    if not hasattr(queue, "peek"):  # pragma: no cover - a dialect still being written
        pytest.skip(f"the {queue.name} dialect has no peek yet")


async def test_peek_orders_like_claim_and_claims_nothing(queue: Queue) -> None:
    _peek_or_skip(queue)
    now = queue.clock.now()
    await queue.insert(Lane.NORMAL, [Row("n", b"n1"), Row("n", b"n2")])
    await queue.insert(Lane.TIMED, [Row("t", b"later", now + 3600), Row("t", b"due", now - 1)])
    await queue.insert(Lane.EMERGENCY, [Row("e", b"\x00\xff")])

    rows = await queue.peek(10)
    assert [r["blob"] for r in rows] == [b"\x00\xff", b"due", b"later", b"n1", b"n2"]
    assert [r["lane"] for r in rows] == ["emergency", "timed", "timed", "normal", "normal"]
    assert all(set(r) == KEYS for r in rows)
    assert rows[1]["ready"] == pytest.approx(now - 1, abs=1e-5)
    assert rows[0]["ready"] is None and rows[3]["ready"] is None
    assert {r["deliveries"] for r in rows} == {0} and {r["lease_until"] for r in rows} == {0}

    assert [r["blob"] for r in await queue.peek(2)] == [b"\x00\xff", b"due"]
    assert [r["blob"] for r in await queue.peek(10, Lane.NORMAL)] == [b"n1", b"n2"]

    # Peeking changed nothing: the claim sees every due row, delivered for the first time.
    leases = await queue.claim([Want("t", 10), Want("n", 10)], now, 30.0, emergency=10)
    assert [(x.blob, x.deliveries) for x in leases] == [
        (b"\x00\xff", 1), (b"due", 1), (b"n1", 1), (b"n2", 1),
    ]  # fmt: skip
    # Leased rows are still shown, with their lease.
    after = {r["blob"]: r for r in await queue.peek(10)}
    assert after[b"n1"]["lease_until"] > now and after[b"n1"]["deliveries"] == 1
    assert after[b"later"]["lease_until"] == 0
