"""The package's rooms import one way: no import cycle between modules, no import from a higher layer.

Every module of `passes` (with `kernels/` and `targets/`, installed as `passes.kernels` and
`passes.targets`) is parsed with `ast`; every import that runs counts, module-level or inside a function
(the lazy ones too; `if TYPE_CHECKING:` imports do not run), so does every module a package's lazy
`_EXPORTS` table names, and `from passes.x import y` names module `passes.x.y` when that is a module.
The layers, bottom up, are `LAYERS`; a module may import its own layer and the ones below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> the package it is installed as
PACKAGES = {ROOT / "passes": "passes", ROOT / "kernels": "passes.kernels", ROOT / "targets": "passes.targets"}
#: bottom up; a module belongs to the first (longest) prefix that matches it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("passes.core", "passes.samples")),  # samples: built with onnx.helper, imports core only
    ("numerics", ("passes.numerics",)),  # below infra: the manager's numeric instrument, quantize's calibration
    ("infra", ("passes.infra", "passes.targets", "passes.testing")),  # targets parse pipelines; testing wraps passes
    ("transforms", ("passes.transforms",)),
    ("frontend", ("passes.frontend",)),
    ("lowering", ("passes.lowering", "passes.kernels")),
    ("tuning", ("passes.tuning",)),
    ("deploy", ("passes.deploy",)),
    ("api", ("passes.api", "passes")),
    ("cli", ("passes.cli",)),
]


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        found.update(_lazy_exports(node))
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in known else base)
    return {module for module in found if module in known and module != name}


def _lazy_exports(node: ast.AST) -> set[str]:
    """The modules a package's `_EXPORTS = {"name": "passes.x.y", ...}` table imports on first use."""
    if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
            and any(isinstance(target, ast.Name) and target.id == "_EXPORTS" for target in node.targets)):
        return set()
    return {value.value for value in node.value.values
            if isinstance(value, ast.Constant) and isinstance(value.value, str)}


def _runtime_nodes(tree: ast.AST):  # -> Iterator[ast.AST]
    """Every node of `tree` except those under `if TYPE_CHECKING:` (type-only imports never run)."""
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                pending.extend(child.orelse)
                continue
            pending.append(child)


def layer_of(module: str) -> int:
    best, best_length = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    return best


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer() -> None:
    assert [name for name in modules() if layer_of(name) < 0] == []


def test_no_import_cycle() -> None:
    assert cycles(graph()) == []


def test_no_import_from_a_higher_layer() -> None:
    upward = [f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
              for name, targets in sorted(graph().items()) for target in sorted(targets)
              if layer_of(target) > layer_of(name)]
    assert upward == []


def test_every_package_says_what_it_holds_and_may_import() -> None:
    for name, path in modules().items():
        if path.name == "__init__.py":
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert len(doc.splitlines()) >= 2, f"{name}: the package docstring says in two lines what it holds"


def test_the_checks_can_fail() -> None:
    """The cycle finder and the layer map catch what they are for (a two-module circle, an upward import)."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert layer_of("passes.core.ir") < layer_of("passes.lowering._lower") < layer_of("passes.cli.main")
    assert layer_of("passes.kernels.x86_int8") == layer_of("passes.lowering._dispatch")
    assert layer_of("passes.samples") == layer_of("passes.core.ir")
    assert layer_of("passes.targets") == layer_of("passes.testing") == layer_of("passes.infra.pipeline")


def test_lazy_and_relative_imports_are_seen(tmp_path: Path) -> None:
    """A function-level import, a relative one and a lazy `_EXPORTS` entry all count as imports."""
    known = {"passes.core.ir", "passes.core.errors", "passes.deploy.run", "passes.lowering._build", "passes.deploy"}
    source = tmp_path / "ir.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from .errors import PassesError\n"
        "_EXPORTS = {'build': 'passes.lowering._build'}\n"
        "if TYPE_CHECKING:\n    from passes.deploy import summary\n"
        "def late():\n    from passes.deploy import run\n"
    )
    seen = imports("passes.core.ir", source, known)
    assert seen == {"passes.core.errors", "passes.deploy.run", "passes.lowering._build"}
    assert [target for target in seen if layer_of(target) > layer_of("passes.core.ir")] != []


@pytest.mark.parametrize("limit", [400])
def test_modules_stay_small(limit: int) -> None:
    """STYLE: a module over ~400 lines is asking to be split."""
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > limit}
    assert long == {}
