"""The layers import downwards only: config <- model, data <- parallel <- train <- checks, eval, bench <-
planning <- cli.

Statically: every import statement of every module under src/dchag (module level or inside a function,
absolute or relative) is read from its AST; each package (and top-level module) may import only the
packages declared below it in ALLOWED, every package on disk must be declared there, and the package
graph has no cycle. At run time: importing a module pulls in no layer above it (checked in a fresh
interpreter, for the modules whose import cost matters).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src"
ROOT_PACKAGE = SRC / "dchag"

_BASE = {"dchag.config", "dchag.configure", "dchag.data", "dchag.model", "dchag.tasks"}
# unit -> the units it may import ("dchag" is the package's own __init__: version and torch check).
# bench never imports planning: the planner is built on bench's measurement tools (and adds its
# `paper-plan` sweep in planning/sweeps.py); viz only draws what it is given.
ALLOWED: dict[str, set[str]] = {
    "dchag": set(),
    "dchag.config": set(),
    "dchag.compare": set(),
    "dchag.viz": set(),
    "dchag.adapters": {"dchag.model"},  # works on the objects it is given: a front end and a foreign backbone
    "dchag.model": {"dchag.config"},
    "dchag.data": {"dchag.config"},
    "dchag.tasks": {"dchag.config"},
    "dchag.configure": {"dchag.config", "dchag.data", "dchag.model"},
    "dchag.parallel": {"dchag", "dchag.config", "dchag.model"},
    "dchag.train": _BASE | {"dchag", "dchag.parallel"},
    "dchag.eval": _BASE | {"dchag.parallel", "dchag.train", "dchag.viz"},
    "dchag.checks": _BASE | {"dchag.compare", "dchag.parallel", "dchag.train"},
    "dchag.bench": _BASE | {"dchag.parallel", "dchag.train", "dchag.eval"},
    "dchag.planning": {"dchag.config", "dchag.configure", "dchag.model", "dchag.parallel", "dchag.train"}
    | {"dchag.bench"},
    "dchag.use": _BASE | {"dchag", "dchag.parallel", "dchag.train", "dchag.eval", "dchag.viz", "dchag.bench"},
    "dchag.cli": _BASE
    | {"dchag", "dchag.parallel", "dchag.train", "dchag.eval", "dchag.checks", "dchag.bench", "dchag.planning"}
    | {"dchag.viz", "dchag.use"},
    "dchag.__main__": {"dchag.cli"},
}
# The public facade: `dchag.load` is imported by the package's PEP 562 `__getattr__` on first access,
# after `dchag` itself is fully imported, so the edge upwards is no import-time cycle. It is allowed
# only there (test_the_facade_import_is_lazy) and left out of the cycle checks.
LAZY_FACADE: dict[str, set[str]] = {"dchag": {"dchag.use"}}


def units_on_disk(root: Path = ROOT_PACKAGE) -> set[str]:
    """Every subpackage (a folder with __init__.py) and top-level module of `root`, and `root` itself."""
    name = root.name
    found = {name}
    for path in root.iterdir():
        if path.is_dir() and (path / "__init__.py").is_file():
            found.add(f"{name}.{path.name}")
        elif path.suffix == ".py" and path.name != "__init__.py":
            found.add(f"{name}.{path.stem}")
    return found


def _module_name(path: Path, src: Path) -> tuple[str, list[str]]:
    """(dotted module name, its package as parts) of a file under `src`."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), parts
    return ".".join(parts), parts[:-1]


def imported_modules(source: str, package: list[str]) -> list[tuple[str, int]]:
    """(absolute dotted name, line) of everything `source` imports, anywhere in it (function-level imports
    too); relative imports resolved against `package`; `from m import n` yields m.n (a submodule or a
    name in m: `unit_of` decides)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found += [(f"{module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def unit_of(module: str, units: set[str]) -> str | None:
    """The package unit `module` belongs to (None outside the package): dchag.x.y -> dchag.x when dchag.x
    is a subpackage or top-level module, else dchag (a name defined in dchag/__init__.py)."""
    root = next(iter(units)).split(".")[0]
    parts = module.split(".")
    if parts[0] != root:
        return None
    return ".".join(parts[:2]) if ".".join(parts[:2]) in units else root


def import_graph(src: Path = SRC, root: str = "dchag") -> dict[str, dict[str, list[str]]]:
    """unit -> {imported unit: ["file:line", ...]} for every module under src/root."""
    units = units_on_disk(src / root)
    graph: dict[str, dict[str, list[str]]] = {u: {} for u in units}
    for path in sorted((src / root).rglob("*.py")):
        name, package = _module_name(path, src)
        me = unit_of(name, units)
        for target, line in imported_modules(path.read_text(), package):
            other = unit_of(target, units)
            if other is not None and other != me:
                graph[me].setdefault(other, []).append(f"{path.relative_to(src)}:{line}")
    return graph


def find_cycle(graph: dict[str, set[str] | dict]) -> list[str] | None:
    """One cycle of the directed graph (a list of nodes, first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_every_package_and_top_level_module_has_a_declared_layer():
    """A new package (or top-level module) fails here until its place in ALLOWED is decided."""
    on_disk = units_on_disk()
    assert {"dchag.model", "dchag.bench", "dchag.planning", "dchag.viz", "dchag.cli"} <= on_disk
    assert on_disk == set(ALLOWED), (on_disk - set(ALLOWED), set(ALLOWED) - on_disk)


def test_each_package_imports_only_the_layers_declared_below_it():
    graph = import_graph()
    wrong = {
        f"{unit} -> {other}": where[:3]
        for unit, targets in graph.items()
        for other, where in targets.items()
        if other not in ALLOWED.get(unit, set()) | LAZY_FACADE.get(unit, set())
    }
    assert not wrong, wrong
    assert "dchag.planning" not in graph["dchag.bench"] and "dchag.bench" not in graph["dchag.viz"]


def test_there_are_no_import_cycles_between_packages():
    graph = {unit: set(targets) - LAZY_FACADE.get(unit, set()) for unit, targets in import_graph().items()}
    assert find_cycle(graph) is None
    assert find_cycle(ALLOWED) is None  # the declared layering itself is an order


def test_the_cycle_detector_finds_a_cycle():
    """Counter-check: a synthetic graph with a cycle (and a self-contained acyclic part) is flagged."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"x"}}) == ["x", "y", "x"]
    # the old bench <-> planning imports, as the graph saw them, are a cycle
    assert find_cycle({"dchag.bench": {"dchag.planning"}, "dchag.planning": {"dchag.bench"}})


def test_the_import_scanner_sees_function_level_relative_and_from_imports(tmp_path):
    """Counter-check: imports hidden in a function, relative imports and `from pkg import sub` all give
    an edge, so a new upward import cannot slip past the layering test."""
    root = tmp_path / "pkg"
    for sub in ("low", "high"):
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text("")
    (root / "__init__.py").write_text("VERSION = 1\n")
    (root / "top.py").write_text("")
    (root / "low" / "a.py").write_text(
        "import os\n\ndef f():\n    from ..high import thing\n    from pkg import top\n    from . import b\n"
    )
    (root / "low" / "b.py").write_text("from pkg import VERSION\nimport pkg.high.c\n")
    graph = import_graph(tmp_path, "pkg")
    assert set(graph["pkg.low"]) == {"pkg.high", "pkg.top", "pkg"}
    assert graph["pkg.low"]["pkg.high"] == ["pkg/low/a.py:4", "pkg/low/b.py:2"]
    assert graph["pkg.high"] == {} and graph["pkg.top"] == {}
    assert find_cycle(graph) is None


def test_the_facade_import_is_lazy():
    """dchag/__init__.py imports upper layers only inside its module `__getattr__`, and `import dchag`
    loads no dchag subpackage (nor torch)."""
    init = ROOT_PACKAGE / "__init__.py"
    tree = ast.parse(init.read_text())
    lazy = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__")
    inside = {id(n) for n in ast.walk(lazy)}
    upward = [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("dchag.") and id(n) not in inside
    ]
    assert not upward, f"dchag/__init__.py imports a subpackage outside __getattr__ at lines {upward}"
    out = subprocess.run(
        [sys.executable, "-c", "import dchag, sys; print(sorted(m for m in sys.modules if m.startswith(('dchag.', "
         "'torch'))))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "[]", out.stdout


PROBE = """
import importlib, json, sys
importlib.import_module({module!r})
print(json.dumps(sorted({{".".join(m.split(".")[:2]) for m in sys.modules if m.startswith("dchag.")}})))
"""


def layers_imported_by(module: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module)], capture_output=True, text=True, check=True
    )
    return set(json.loads(out.stdout))


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("dchag.config", {"dchag.data", "dchag.model", "dchag.parallel", "dchag.train", "dchag.tasks"}),
        ("dchag.model", {"dchag.data", "dchag.parallel", "dchag.train", "dchag.checks"}),
        ("dchag.parallel.parallelize", {"dchag.train", "dchag.checks", "dchag.data", "dchag.tasks"}),
        ("dchag.tasks", {"dchag.train", "dchag.parallel", "dchag.data"}),
        ("dchag.train.loop", {"dchag.checks", "dchag.eval", "dchag.bench", "dchag.planning"}),
        ("dchag.planning.planner", {"dchag.checks", "dchag.eval", "dchag.data"}),
    ],
)
def test_importing_a_module_loads_no_layer_above_it(module, forbidden):
    assert not layers_imported_by(module) & forbidden
