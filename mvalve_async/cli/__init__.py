"""The `mvalve` command line (`mvalve = mvalve_async.cli:main`; also
`python -m mvalve_async.cli`).

- commands.py: the parser, `main`, and the built-in commands (create, drop, send,
  stats, peek, purge, dead);
- common.py: what every command shares (`Command`, `Context`, `UsageError`,
  `number`), plugins included;
- views.py: the rich tables and JSON shapes of stats, peek and dead letters;
- demo.py, statslog.py: the `mvalve demo` and `mvalve statslog` plugins, loaded by
  name (commands.PLUGINS), as is the repository's `bench/run.py`.

The library never imports this package.
"""

from .commands import main

__all__ = ["main"]
