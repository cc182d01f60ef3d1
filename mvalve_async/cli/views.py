"""What `mvalve` shows: JSON-ready views (the `--json` output) and rich tables of them."""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ..errors import CodecError, MvalveError, StoreError
from ..interfaces import Lane, Queue, Store
from ..message import decode
from ..throttle import Valve

__all__ = [
    "dead_table", "fmt_time", "peek_table", "row_view", "snapshot", "stats_view"]  # fmt: skip

PREVIEW = 60
STORE_PROBE = "mvalve-stats-probe"  # a key read to tell whether the store answers


def fmt_time(t: float | None, now: float | None = None) -> str:
    """Local wall time (the time of day alone within a day of `now`), with the
    distance from `now` when it is given."""
    if not t:
        return "-"
    near = now is not None and abs(t - now) < 86400
    stamp = time.strftime("%H:%M:%S" if near else "%Y-%m-%d %H:%M:%S", time.localtime(t))
    if now is None:
        return stamp
    delta = t - now
    return f"{stamp} ({'in ' if delta >= 0 else ''}{abs(delta):.1f}s{'' if delta >= 0 else ' ago'})"


def row_view(row: Mapping[str, Any], now: float) -> dict[str, Any]:
    """A queued row or a dead letter (from `peek` / `dead_letters`) as a JSON-ready
    dict: its columns, plus the decoded message (content, or content_base64 for
    bytes), or `error` when the blob cannot be decoded."""
    out = {k: v for k, v in row.items() if k not in ("blob", "lease_until")}
    if "lease_until" in row:
        out["leased"] = bool(row["lease_until"] and row["lease_until"] > now)
    try:
        msg = decode(row["blob"])
    except CodecError as exc:
        out["error"] = str(exc)
        return out
    out.update(
        message_id=msg.id,
        created=msg.created,
        emergency=msg.emergency,
        duration=msg.duration,
        headers=dict(msg.headers.items()),
    )
    if isinstance(msg.content, bytes):
        out["content_base64"] = base64.b64encode(msg.content).decode("ascii")
    else:
        out["content"] = msg.content
    return out


def _preview(view: Mapping[str, Any]) -> Text:
    if "error" in view:
        return Text(f"<{view['error']}>", style="red")
    if "content_base64" in view:
        size = len(base64.b64decode(view["content_base64"]))
        return Text(f"<{size} bytes>", style="dim")
    content = view["content"]
    text = content if isinstance(content, str) else orjson.dumps(content).decode()
    return Text(text if len(text) <= PREVIEW else text[: PREVIEW - 1] + "…")


def peek_table(views: Sequence[Mapping[str, Any]], now: float, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("lane", "id", "destination", "ready", "tries", "state", "content"):
        table.add_column(name, no_wrap=name in ("lane", "id"))
    for v in views:
        ready = fmt_time(v["ready"], now) if v.get("ready") else "-"
        state = Text("leased", style="yellow") if v.get("leased") else Text("queued")
        table.add_row(
            v["lane"], str(v["id"]), Text(v["destination"]), ready, str(v["deliveries"]),
            state, _preview(v),
        )  # fmt: skip
    if not views:
        table.caption = "no queued messages"
    return table


def dead_table(views: Sequence[Mapping[str, Any]], title: str) -> Table:
    """`id`: the dead letter's row (what `dead requeue` takes); `message id`: the
    message's own id (`msg.id`, the one the readers' log lines give)."""
    table = Table(title=title, title_justify="left")
    for name in ("id", "message id", "lane", "destination", "reason", "tries", "died", "content"):
        table.add_column(name, no_wrap=name in ("id", "message id"))
    for v in views:
        table.add_row(
            str(v["id"]), v.get("message_id", "-"), v["lane"], Text(v["destination"]),
            Text(v["reason"]), str(v["deliveries"]), fmt_time(v["died_at"]), _preview(v),
        )  # fmt: skip
    if not views:
        table.caption = "no dead letters"
    else:
        table.caption = "dead requeue takes the id column"
    return table


async def snapshot(queue: Queue, store: Store, limit: int, url: str) -> dict[str, Any]:
    """Depth per lane and destination, with each shown destination's valve state."""
    now = queue.clock.now()
    st = await queue.stats(now)
    ranked = sorted(st.by_destination.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    valve, store_error = Valve(store, queue.clock), None
    destinations: dict[str, Any] = {}
    for dest, counts in ranked[:limit]:
        d: dict[str, Any] = {
            "queued": {str(lane): counts.get(str(lane), 0) for lane in Lane},
            "leased": counts.get("leased", 0), "dead": counts.get("dead", 0),
            "paused_until": None, "emergency_until": None, "last_sent": None,
            "in_flight": None, "in_flight_limit": None,
        }  # fmt: skip
        destinations[dest] = d
        if store_error is not None:
            d["state_error"] = store_error
            continue
        try:
            rec = await valve.record(dest)
        except MvalveError as exc:  # a store that is down, or one unreadable record
            d["state_error"] = str(exc)
            if isinstance(exc, StoreError):
                store_error = str(exc)
            continue
        d["paused_until"] = rec.paused if rec.paused > now else None
        d["emergency_until"] = rec.emergency if rec.emergency > now else None
        d["last_sent"] = rec.sent[-1] if rec.sent else None
        if rec.limit:  # a concurrency limit: in flight now, against it
            d["in_flight"], d["in_flight_limit"] = rec.live(now), rec.limit
    if not destinations:  # nothing asked of the store yet: is it there at all?
        try:
            await store.get(STORE_PROBE)
        except StoreError as exc:
            store_error = str(exc)
    return {
        "url": url,
        "time": now, "queued": {str(k): v for k, v in st.queued.items()},
        "leased": {str(k): v for k, v in st.leased.items()}, "dead": st.dead,
        "next_due": st.next_due, "destinations_total": len(ranked),
        "destinations": destinations, "store_error": store_error,
    }  # fmt: skip


def _state(d: Mapping[str, Any], now: float) -> Text:
    if d.get("state_error"):
        return Text("?", style="dim")
    parts = []
    if d.get("emergency_until"):
        parts.append(Text(f"emergency {d['emergency_until'] - now:.0f}s", style="bold red"))
    if d.get("paused_until"):
        parts.append(Text(f"paused {d['paused_until'] - now:.0f}s", style="yellow"))
    if d.get("in_flight_limit"):
        full = d["in_flight"] >= d["in_flight_limit"]
        parts.append(Text(f"in flight {d['in_flight']}/{d['in_flight_limit']}",
                          style="yellow" if full else ""))  # fmt: skip
    return Text(", ").join(parts) if parts else Text("open", style="green")


def stats_view(snap: Mapping[str, Any]) -> RenderableType:
    """The `mvalve stats` screen from the snapshot dict that `--json` prints."""
    now = snap["time"]
    head = Text.assemble((snap["url"], "bold"), f"  {fmt_time(now)}  next due: ")
    head.append(fmt_time(snap["next_due"], now))
    lanes = Table()
    for name in ("lane", "queued", "leased"):
        lanes.add_column(name, justify="left" if name == "lane" else "right")
    for lane in Lane:
        lanes.add_row(str(lane), str(snap["queued"][lane]), str(snap["leased"][lane]))
    lanes.add_row("dead", str(snap["dead"]), "", style="red" if snap["dead"] else None)

    dests = Table(title_justify="left")
    dests.title = f"destinations ({len(snap['destinations'])} of {snap['destinations_total']})"
    for name in ("destination", "emerg", "timed", "normal", "leased", "dead"):
        dests.add_column(name, justify="left" if name == "destination" else "right")
    dests.add_column("state", no_wrap=True)
    dests.add_column("last sent", justify="right", no_wrap=True)
    for dest, d in snap["destinations"].items():
        last = f"{now - d['last_sent']:.1f}s ago" if d.get("last_sent") else "-"
        dests.add_row(
            Text(dest), *(str(d["queued"][lane]) for lane in Lane), str(d["leased"]),
            str(d["dead"]), _state(d, now), last,
        )  # fmt: skip
    parts: list[RenderableType] = [head, lanes, dests]
    if snap.get("store_error"):
        parts.append(Text(f"state store: {snap['store_error']}", style="yellow"))
    return Group(*parts)
