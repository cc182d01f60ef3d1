"""Every dotted name of the package the README writes (`mvalve_async.ops.StatsLog`,
`from mvalve_async.ops import StatsLog`) can be imported from where it says."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import mvalve_async

README = Path(mvalve_async.__file__).resolve().parents[1] / "README.md"
DOTTED = re.compile(r"\bmvalve_async(?:\.[A-Za-z_]\w*)+")
FROM = re.compile(r"\bfrom (mvalve_async(?:\.\w+)*) import (\w+(?:, \w+)*)")


def _resolve(dotted: str) -> object:
    """The object `dotted` names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            found = getattr(found, attr)
        return found
    raise ImportError(dotted)


def test_the_readme_names_what_it_imports_where_it_is() -> None:
    text = README.read_text("utf-8")
    names = set(DOTTED.findall(text))
    for module, imported in FROM.findall(text):
        names.update(f"{module}.{n.strip()}" for n in imported.split(",") if n.strip())
    assert "mvalve_async.ops.StatsLog" in names  # the scan sees both spellings
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"the README names what does not exist: {missing}"
