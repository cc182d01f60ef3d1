"""`Pipe.reader()`, `writer()` and `serve()` pass their keyword options on to what
they build, with the types of what they build: a type checker checks a user's
keyword arguments (`ReaderOptions`, `WriterOptions`), and the options stay in step
with `Reader.__init__` and `Writer.__init__`."""

from __future__ import annotations

import inspect
import os
import textwrap
import typing
from pathlib import Path
from typing import Any

import pytest
from mypy import api as mypy_api

import mvalve_async
from mvalve_async import Reader, Writer
from mvalve_async.reader import ReaderOptions
from mvalve_async.writer import WriterOptions


def _keywords(init: Any, skip: set[str]) -> dict[str, Any]:
    hints = typing.get_type_hints(init)
    return {
        name: hints[name]
        for name, p in inspect.signature(init).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in skip
    }


@pytest.mark.parametrize(
    ("options", "init"),
    [(ReaderOptions, Reader.__init__), (WriterOptions, Writer.__init__)],
)
def test_the_options_are_the_keywords_of_what_the_pipe_builds(options: Any, init: Any) -> None:
    assert typing.get_type_hints(options) == _keywords(init, set())
    assert not options.__required_keys__  # every one has the class's default


def test_pipe_serve_takes_the_readers_options_besides_its_own() -> None:
    from mvalve_async.pipe import Pipe

    own = {"handler", "concurrency", "retry_delay", "stop", "poll", "with_reader"}
    params = inspect.signature(Pipe.serve).parameters
    assert set(params) - {"self", "reader_options"} == own
    assert params["reader_options"].kind is inspect.Parameter.VAR_KEYWORD


SNIPPET = """
    import asyncio
    import mvalve_async
    from mvalve_async import Message, Rate

    async def handle(msg: Message) -> None: ...

    async def main() -> None:
        async with mvalve_async.open("memory://") as pipe:
            pipe.reader(rate=Rate(5, 1.0), rates={"a": None}, lease=3.0, batch=4)
            pipe.writer(max_size=1024)
            await pipe.serve(handle, concurrency=2, poll=0.1, rate=Rate(1, 1.0))
            pipe.reader(lease="30")          # line 12: wrong type
            pipe.reader(leese=30.0)          # line 13: no such option
            pipe.writer(max_size="1k")       # line 14: wrong type
            await pipe.serve(handle, batch="16")  # line 15: wrong type
"""


@pytest.mark.slow
def test_mypy_checks_the_keyword_arguments_of_a_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "user.py"
    source.write_text(textwrap.dedent(SNIPPET).lstrip("\n"))
    monkeypatch.setenv("MYPYPATH", str(Path(mvalve_async.__file__).resolve().parents[1]))
    out, err, status = mypy_api.run(
        ["--strict", "--no-incremental", "--cache-dir", os.devnull, str(source)]
    )
    lines = sorted({int(line.split(":")[1]) for line in out.splitlines() if ": error:" in line})
    assert lines == [12, 13, 14, 15], out + err
    assert status == 1
