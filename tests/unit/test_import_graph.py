"""The package's modules import each other without cycles, deferred or not, and
each layer (a root module, or a subpackage) imports only the layers `ALLOWED` lists
(the README's "Architecture" section).

The graph is read from the source (the AST), not from an import: every `import` and
`from ... import` of a module of the package counts, at the top or inside a
function or method, except those under `if TYPE_CHECKING:` (seen by type checkers
only; their `else:` branch runs, so it counts). A module that imports a package
depends on that package's `__init__`; `from pkg import name` depends on `pkg.name`
when that is a module, else on `pkg`. A module is not taken to depend on the
packages above it (Python initialises those first, whoever imports it).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import mvalve_async

PACKAGE = "mvalve_async"
ROOT = Path(mvalve_async.__file__).resolve().parent


def modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node that runs at some time, skipping `if TYPE_CHECKING:` bodies."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, source: str, known: set[str], is_package: bool = False) -> set[str]:
    """The modules of `known` that module `name` imports (see the module docstring)."""
    here = name if is_package else name.rpartition(".")[0]  # what `.` means in it
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {
        name: imports_of(name, path.read_text("utf-8"), known, path.name == "__init__.py")
        for name, path in found.items()
    }


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, in name order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_package_imports_without_cycles() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_graph_sees_deferred_imports_and_skips_type_checking_ones() -> None:
    known = {"p", "p.a", "p.b", "p.c", "p.d", "p.sub", "p.sub.e"}
    source = (
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "import p.a\n"
        "if TYPE_CHECKING:\n"
        "    from .b import B\n"
        "else:\n"
        "    from . import d\n"
        "def f():\n"
        "    from .c import C\n"
        "from .sub import e\n"
    )
    assert imports_of("p.mod", source, known) == {"p.a", "p.c", "p.d", "p.sub.e"}
    assert imports_of("p.sub.e", "from .. import a\nfrom ..sub import x\n", known) == {
        "p.a",
        "p.sub",
    }
    assert imports_of("p.sub", "from . import e\n", known, is_package=True) == {"p.sub.e"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_registry_is_seen_importing_the_dialects() -> None:
    """The real graph includes the registry's deferred imports (inside factories)."""
    edges = graph()
    assert "mvalve_async.queues.innodb" in edges["mvalve_async.registry"]
    assert "mvalve_async.registry" not in edges["mvalve_async.queues.innodb"]


# Who may import whom, by layer (a module of the root, or a subpackage "x/"): the
# README's "Architecture" map. Anything not listed here is a new dependency between
# layers: add it here deliberately, or find it a better place.
# fmt: off
ALLOWED: dict[str, set[str]] = {
    # leaves and the contract
    "errors": set(),
    "clock": set(),
    "tuning": set(),
    "events": set(),
    "notify": set(),
    "interfaces": {"clock"},
    "message": {"errors"},
    "urls": {"errors", "interfaces"},
    "schema/": {"interfaces", "urls"},
    # the engine: the contract only, never a backend
    "throttle/": {"clock", "errors", "interfaces", "tuning"},
    "reader/": {
        "clock", "errors", "events", "interfaces", "message", "notify", "throttle/", "tuning"
    },
    # backends: the contract and the settings, never the engine
    "queues/": {"clock", "errors", "interfaces", "schema/", "tuning", "urls"},
    "stores/": {"errors", "interfaces", "urls"},
    # the registry names the backends; the public face binds engine and registry
    "registry": {"interfaces", "queues/", "stores/", "urls"},
    "writer": {"events", "interfaces", "message", "notify"},
    "serve": {"errors", "message", "reader/"},
    "pipe": {"events", "interfaces", "reader/", "registry", "serve", "urls", "writer"},
    "__init__": {
        "errors", "interfaces", "message", "pipe", "reader/", "registry", "throttle/", "urls",
        "writer"
    },
    # on top: nothing below imports them
    "ops/": {"errors", "events", "interfaces", "queues/", "schema/", "throttle/", "urls"},
    "cli/": {
        "__init__", "errors", "events", "interfaces", "message", "ops/", "pipe", "registry",
        "throttle/", "urls"
    },
}
# fmt: on


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1] + "/" if (ROOT / parts[1]).is_dir() else parts[1]


def test_layers_import_only_what_the_architecture_allows() -> None:
    unexpected = sorted(
        f"{a} -> {b} ({layer(a)} -> {layer(b)})"
        for a, targets in graph().items()
        for b in targets
        if layer(a) != layer(b) and layer(b) not in ALLOWED.get(layer(a), set())
    )
    assert not unexpected, "imports across layers that ALLOWED does not list:\n" + "\n".join(
        unexpected
    )
    assert set(ALLOWED) == {layer(m) for m in modules()}  # every layer is listed


def test_no_layer_imports_another_subpackages_private_modules() -> None:
    """A subpackage's `_`-prefixed modules are its own: other layers use its face."""
    private = sorted(
        f"{a} -> {b}"
        for a, targets in graph().items()
        for b in targets
        if layer(a) != layer(b) and b.rpartition(".")[2].startswith("_")
    )
    assert not private, "imports of another layer's private modules:\n" + "\n".join(private)
