"""The package's layer order, enforced (docs/architecture.md).

Every module under ``lightning_lth/`` is parsed with ``ast``; every import of our own code is
read, at any depth (a function's lazy import counts as much as the module's own), relative
ones resolved. An import edge goes to the module it names: ``from a.b import c`` to ``a.b.c``
if that is a module, else to ``a.b``; a package's ``__init__`` is a module of its own, and the
parent packages Python runs on the way are not edges (else every package that re-exports its
submodules would be a circle with each of them).

A module may import only from its own layer or a lower one (``LAYERS``, low to high), and no
modules may import each other in a circle, nor the packages they sit in (``sparsity`` and
``symmetry`` may not need each other through different modules).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_lth"

# layer name -> the modules in it (a dotted name covers the package below it too), low first.
LAYERS: dict[str, tuple[str, ...]] = {
    "foundations": ("lightning_lth", "lightning_lth.errors", "lightning_lth.io",
                    "lightning_lth.distributed", "lightning_lth.cuda_streams",
                    "lightning_lth.ranges"),
    # figures from plain numbers: the match stage draws interpolation.png with report.plots;
    # report.diversity: pure metrics of output tensors
    "figures": ("lightning_lth.report.aggregate", "lightning_lth.report.diversity",
                "lightning_lth.report.plots"),
    "nets": ("lightning_lth.sparsity", "lightning_lth.symmetry", "lightning_lth.models",
             "lightning_lth.numerics"),
    "training": ("lightning_lth.data", "lightning_lth.training", "lightning_lth.callbacks"),
    "experiment": ("lightning_lth.experiment",),
    "parsing": ("lightning_lth.parsing",),
    "grid": ("lightning_lth.grid",),
    "report": ("lightning_lth.report",),
    "cli": ("lightning_lth.cli", "lightning_lth.__main__"),
}


def modules_under(package: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, whether it is a package's ``__init__``)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _named(name: str, known: Iterable[str]) -> str | None:
    """The longest known module that ``name`` is or lies in (``a.b.C`` -> ``a.b``)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return None


def imports_of(module: str, path: Path, is_package: bool, known: set[str],
               root: str) -> set[str]:
    """The known modules that ``module`` imports, anywhere in its file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[:len(package) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            if name == root or name.startswith(root + "."):
                target = _named(name, known)
                if target is not None and target != module:
                    out.add(target)
    return out


def import_graph(package: Path) -> dict[str, set[str]]:
    known = modules_under(package)
    return {module: imports_of(module, path, is_package, set(known), package.name)
            for module, (path, is_package) in known.items()}


def entry_of(module: str, layers: dict[str, tuple[str, ...]], root: str
             ) -> tuple[str, str] | None:
    """(layer, entry) of the table's entry that is ``module`` or the package above it, the
    longest one (the root package's own ``__init__`` only by its exact name)."""
    best = None
    for layer, entries in layers.items():
        for entry in entries:
            covers = module == entry or (entry != root and module.startswith(entry + "."))
            if covers and (best is None or len(entry) > len(best[1])):
                best = (layer, entry)
    return best


def layer_of(module: str, layers: dict[str, tuple[str, ...]], root: str) -> str | None:
    found = entry_of(module, layers, root)
    return found[0] if found else None


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def package_graph(graph: dict[str, set[str]], layers: dict[str, tuple[str, ...]],
                  root: str) -> dict[str, set[str]]:
    """The same edges between the table's entries (``root.sparsity``, ``root.report.plots``,
    ``root.report``): a package's modules count as one, but for those the table places in a
    layer of their own."""
    def unit(module: str) -> str:
        found = entry_of(module, layers, root)
        return found[1] if found else ".".join(module.split(".")[:2])

    out: dict[str, set[str]] = {}
    for module, targets in graph.items():
        out.setdefault(unit(module), set()).update(
            unit(t) for t in targets if unit(t) != unit(module))
    return out


def violations(package: Path, layers: dict[str, tuple[str, ...]]) -> list[str]:
    """Every break of the order, one line each: a module outside the table, an upward
    import, a circle of modules, a circle of packages."""
    root = package.name
    graph = import_graph(package)
    order = list(layers)
    problems = [f"{module}: in no layer of the table" for module in sorted(graph)
                if layer_of(module, layers, root) is None]
    for module, targets in sorted(graph.items()):
        mine = layer_of(module, layers, root)
        for target in sorted(targets):
            theirs = layer_of(target, layers, root)
            if mine and theirs and order.index(theirs) > order.index(mine):
                problems.append(f"{module} (layer {mine}) imports {target} (layer {theirs}), "
                                f"a higher layer")
    problems += [f"import circle: {' <-> '.join(c)}" for c in circles(graph)]
    problems += [f"package circle: {' <-> '.join(c)}"
                 for c in circles(package_graph(graph, layers, root))]
    return problems


@pytest.mark.quick
def test_lightning_lth_keeps_its_layer_order_without_circles():
    graph = import_graph(PACKAGE)
    assert len(graph) > 40 and "lightning_lth.training.module" in graph  # it read the package
    assert "lightning_lth.symmetry.trace" in graph["lightning_lth.symmetry.matching"]
    problems = violations(PACKAGE, LAYERS)
    assert not problems, "\n".join(problems)


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


TINY_LAYERS = {"low": ("pkg", "pkg.base", "pkg.low"), "high": ("pkg.high",)}


def test_the_checker_finds_upward_lazy_and_relative_imports_and_circles(tmp_path):
    package = write_tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/base.py": "def f():\n    from pkg.high.top import g  # lazy, upward\n",
        "pkg/low/__init__.py": "from . import a\n",  # a package's own re-export: no circle
        "pkg/low/a.py": "from ..base import f\n",
        "pkg/low/b.py": "from .c import x\n",
        "pkg/low/c.py": "import pkg.low.b as b\nx = 1\n",
        "pkg/high/__init__.py": "",
        "pkg/high/top.py": "from pkg.low import a\nfrom pkg import base\ng = 1\n",
        "pkg/stray.py": "",
    })
    graph = import_graph(package)
    assert graph["pkg.low"] == {"pkg.low.a"} and graph["pkg.low.a"] == {"pkg.base"}
    assert graph["pkg.high.top"] == {"pkg.low.a", "pkg.base"}
    assert violations(package, TINY_LAYERS) == [
        "pkg.stray: in no layer of the table",
        "pkg.base (layer low) imports pkg.high.top (layer high), a higher layer",
        "import circle: pkg.base <-> pkg.high.top <-> pkg.low.a",
        "import circle: pkg.low.b <-> pkg.low.c",
        "package circle: pkg.base <-> pkg.high <-> pkg.low",
    ]


def test_the_checker_finds_a_circle_between_packages_through_different_modules(tmp_path):
    package = write_tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "",
        "pkg/low/imp.py": "def names():\n    from pkg.sym.trace import skip\n",
        "pkg/low/mask.py": "",
        "pkg/sym/__init__.py": "",
        "pkg/sym/trace.py": "from pkg.sym.spec import S\nskip = 1\n",
        "pkg/sym/spec.py": "from pkg.low.mask import M\nS = 1\n",
    })
    layers = {"only": ("pkg",) + tuple(f"pkg.{name}" for name in ("low", "sym"))}
    assert violations(package, layers) == ["package circle: pkg.low <-> pkg.sym"]


@pytest.mark.parametrize("module, layer", [
    ("lightning_lth", "foundations"), ("lightning_lth.models.registry", "nets"),
    ("lightning_lth.training.cuda_graphs", "training"), ("lightning_lth.grid.stage_graph", "grid"),
    ("lightning_lth.callbacks", "training"), ("lightning_lth.report.plots", "figures"),
    ("lightning_lth.report.write", "report"), ("lightning_lth.nothing", None),
])
def test_each_module_has_one_layer_by_its_longest_entry(module, layer):
    assert layer_of(module, LAYERS, "lightning_lth") == layer


# -- the tests and benchmarks: shared helpers live in conftest.py / helpers.py ------------
TEST_ONLY = ("conftest", "helpers", "tests")


def imported_names(path: Path) -> set[str]:
    """Every module an ``import`` at any depth of ``path`` names (relative ones as written)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.quick
def test_no_test_module_imports_another_and_bench_imports_no_test_code():
    tests, bench = PACKAGE.parent / "tests", PACKAGE.parent / "bench"
    test_imports = {path.name: imported_names(path) for path in sorted(tests.glob("*.py"))}
    assert {"conftest", "helpers"} <= test_imports["test_fused.py"]  # it read the imports
    assert not {name: sorted(n for n in found if n.split(".")[0].startswith("test_"))
                for name, found in test_imports.items()
                if any(n.split(".")[0].startswith("test_") for n in found)}
    bench_files = sorted(bench.glob("*.py"))
    assert len(bench_files) > 5
    for path in bench_files:
        found = imported_names(path)
        assert not [n for n in found if n.split(".")[0] in TEST_ONLY or n.startswith("test_")], path
        assert "sys.path" not in path.read_text(), f"{path} changes sys.path"
