"""`python -m mvalve_async.cli`: the `mvalve` command."""

from .commands import main

raise SystemExit(main())
