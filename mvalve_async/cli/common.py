"""What every `mvalve` command shares, built-in or plugin: the `Command` record,
the `Context` a command runs in, the errors that end it with a status, and the
`number` argument type. The plugins (demo.py, statslog.py) import this module;
commands.py imports the plugins by name when it builds the parser (the repository's
bench/run.py too), so nothing here imports a command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.prompt import Confirm

from ..pipe import Pipe
from ..registry import make_queue, make_store
from ..urls import QueueSettings, StoreSettings

__all__ = ["Aborted", "Command", "Context", "UsageError", "number"]


class UsageError(Exception):
    """Bad command-line input: exit status 2."""


class Aborted(Exception):
    """The user answered no to a confirmation."""


@dataclass(frozen=True, slots=True)
class Command:
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Context], int | Coroutine[Any, Any, int]]
    url_help: str | None = None  # None: the usual defaults ($MVALVE_URL, ...)
    store_help: str | None = None


class Context:
    """What a command gets besides its arguments: consoles and the backends' URLs."""

    def __init__(self, console: Console, errors: Console, url: str, store_url: str) -> None:
        self.console, self.errors = console, errors
        self.url, self.store_url = url, store_url
        self._settings: QueueSettings | None = None

    @property
    def settings(self) -> QueueSettings:
        if self._settings is None:
            self._settings = QueueSettings.from_url(self.url)
        return self._settings

    def existing(self) -> QueueSettings:
        """The settings for a command that looks at or changes a queue that must exist:
        a missing SQLite file is an error, not created (nor its directory)."""
        return replace(self.settings, create_file=False)

    @contextlib.asynccontextmanager
    async def pipe(
        self, *, create: bool | None = None, existing: bool = False
    ) -> AsyncIterator[Pipe]:
        """A connected pipe (tables created for the embedded dialects, as `open` does).
        `existing`: on a queue that must be there already (`existing()`), no DDL run
        on SQLite either."""
        settings = self.settings
        if existing:
            settings = self.existing()
            create = False if settings.dialect == "sqlite" else create
        store = make_store(StoreSettings.from_url(self.store_url))
        async with Pipe(make_queue(settings), store, create=create) as pipe:
            yield pipe

    def confirm(self, action: str, yes: bool) -> None:
        """Ask "`action`?" on a terminal; refuse (exit 2) on no terminal without --yes."""
        if yes:
            return
        if not sys.stdin.isatty():
            raise UsageError(f"refusing to {action} without --yes (stdin is not a terminal)")
        if not Confirm.ask(escape(action[0].upper() + action[1:] + "?"), console=self.errors):
            raise Aborted

    def print_json(self, data: Any, *, compact: bool = False) -> None:
        text = json.dumps(data, ensure_ascii=False, default=str, indent=None if compact else 2)
        self.console.out(text, highlight=False)

    def say(self, text: str) -> None:
        self.console.print(text, soft_wrap=True)


# -- argument types -------------------------------------------------------------


def number(convert: Callable[[str], Any], low: float, what: str) -> Callable[[str], Any]:
    """An argparse type: `convert(text)`, at least `low`, finite (for plugins too)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not low <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse
