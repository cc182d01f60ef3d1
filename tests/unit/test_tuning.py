"""The engine's tuning constants live in mvalve_async/tuning.py only, and each is used."""

from __future__ import annotations

import ast

from mvalve_async import tuning
from tests.unit.test_import_graph import modules


def test_tuning_constants_are_defined_in_tuning_only_and_used() -> None:
    names = set(tuning.__all__)
    defined: list[str] = []
    used: set[str] = set()
    for name, path in modules().items():
        tree = ast.parse(path.read_text("utf-8"))
        if name == "mvalve_async.tuning":
            continue
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else []
            if isinstance(node, ast.AnnAssign):
                targets = [node.target]
            defined += [
                f"{name}.{t.id}" for t in targets if isinstance(t, ast.Name) and t.id in names
            ]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("tuning"):
                used.update(alias.name for alias in node.names)
    assert not defined, f"tuning constants defined outside tuning.py: {defined}"
    assert used == names, f"not used anywhere: {sorted(names - used)}"
