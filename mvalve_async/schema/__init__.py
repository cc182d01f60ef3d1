"""DDL lives in the `<dialect>.sql` files beside this module (shipped in the wheel).

A file holds sections introduced by `-- section: lane|timed|dead`; each is a
template with `{table}` replaced by a validated identifier. The lane section
serves the emergency and normal lanes.
"""

from __future__ import annotations

import importlib.resources

from ..interfaces import Lane
from ..urls import Tables

__all__ = ["render", "sections"]


def sections(dialect: str) -> dict[str, str]:
    text = importlib.resources.files(__package__).joinpath(f"{dialect}.sql").read_text("utf-8")
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("-- section:"):
            current = out.setdefault(line.split(":", 1)[1].strip(), [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines).strip() for name, lines in out.items()}


def render(dialect: str, tables: Tables) -> list[str]:
    """The CREATE statements for every table, in lane order, dead letters last."""
    parts = sections(dialect)
    statements: list[str] = []
    for lane, name in tables.all():
        template = parts["timed" if lane is Lane.TIMED else "lane"]
        statements.extend(s.strip() for s in template.format(table=name).split(";") if s.strip())
    statements.extend(
        s.strip() for s in parts["dead"].format(table=tables.dead).split(";") if s.strip()
    )
    return statements
