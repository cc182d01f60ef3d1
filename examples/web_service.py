"""A web service that accepts messages over HTTP (aiohttp).

The pipe lives as long as the application (aiohttp's cleanup context): opened
at startup, closed at shutdown, one connection pool shared by every request.

    POST /messages  {"destination": "carrier-a", "content": {...},
                     "emergency": false, "delay": 2.5}   -> 201 {"id": "..."}
    GET  /stats     depth per lane and destination, dead letters -> 200 {...}

    pip install aiohttp
    MVALVE_URL=sqlite:///web.sqlite3 python examples/web_service.py --port 8080
    curl -XPOST localhost:8080/messages -d '{"destination": "d", "content": "hi"}'

Environment: MVALVE_URL (default: the embedded SQLite file), HOST (127.0.0.1),
PORT (8080). For MySQL, create the tables first: `mvalve --url "$MVALVE_URL" create`.
Readers run elsewhere (`examples/worker.py`); writers need no state store.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

import mvalve_async
from mvalve_async import InvalidMessage, Message, MvalveError, Pipe, Writer

PIPE = web.AppKey("pipe", Pipe)
WRITER = web.AppKey("writer", Writer)
FIELDS = {"destination", "content", "emergency", "delay"}


async def pipe_context(app: web.Application) -> AsyncIterator[None]:
    async with mvalve_async.open(os.environ.get("MVALVE_URL")) as pipe:
        app[PIPE] = pipe
        app[WRITER] = pipe.writer()
        yield


def error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


async def post_message(request: web.Request) -> web.Response:
    try:
        body: Any = await request.json()
    except ValueError:
        return error(400, "the body is not JSON")
    if not isinstance(body, dict) or "destination" not in body:
        return error(400, 'expected an object with "destination" (and "content")')
    unknown = set(body) - FIELDS
    if unknown:
        return error(400, f"unknown field(s): {', '.join(sorted(unknown))}")
    if not isinstance(body.get("emergency", False), bool):
        return error(400, '"emergency" must be true or false')
    try:
        msg = Message(
            destination=body["destination"],
            content=body.get("content"),
            emergency=body.get("emergency", False),
            delay=body.get("delay"),
        )
        await request.app[WRITER].insert(msg)
    except InvalidMessage as exc:  # bad destination, delay, size: nothing was written
        return error(400, str(exc))
    except MvalveError as exc:  # the queue is unreachable: retry later
        logging.getLogger("web").warning("insert failed: %s", exc)
        return error(503, "the queue is unavailable")
    return web.json_response({"id": msg.id}, status=201)


async def get_stats(request: web.Request) -> web.Response:
    try:
        stats = await request.app[PIPE].queue.stats(time.time())
    except MvalveError:
        return error(503, "the queue is unavailable")
    return web.json_response(
        {
            "queued": {str(lane): n for lane, n in stats.queued.items()},
            "leased": {str(lane): n for lane, n in stats.leased.items()},
            "dead": stats.dead,
            "next_due": stats.next_due,
            "destinations": stats.by_destination,
        }
    )


def make_app() -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(pipe_context)
    app.router.add_post("/messages", post_message)
    app.router.add_get("/stats", get_stats)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="Accept messages over HTTP.")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def listening(_: str) -> None:  # called once the socket is bound
        print(f"listening on http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)

    web.run_app(make_app(), host=args.host, port=args.port, print=listening)


if __name__ == "__main__":
    main()
