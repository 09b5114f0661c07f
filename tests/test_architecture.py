"""The shape of the code: every module imports on its own, and imports point one way.

Data flows source -> plan -> executor -> sink; the imports follow, except that the executor drives a
sink through its protocol, so sinks sit below it (a sink knows plans, never the executor). A lower layer
never imports a higher one, and no modules import each other in a loop (an import deferred into a function counts too: it is a
dependency all the same). The layers are the README's Architecture section.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "lorafuse"

# lowest first; a module belongs to the first layer with a prefix of its dotted name
LAYERS = [
    ("leaves", ["lorafuse.errors", "lorafuse.units", "lorafuse.version", "lorafuse.formats"]),
    ("inputs", ["lorafuse.sources", "lorafuse.adapters", "lorafuse.quant", "lorafuse.patches", "lorafuse.layouts",
                "lorafuse.costs"]),
    ("plan", ["lorafuse.plan"]),
    ("sinks", ["lorafuse.sinks", "lorafuse.manifest", "lorafuse.output"]),
    ("execute", ["lorafuse.compute", "lorafuse.execute"]),
    ("commands", ["lorafuse.api", "lorafuse.training", "lorafuse.cli", "lorafuse.tools", "lorafuse"]),
]


def modules() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def layer(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and to the README's Architecture section")


def imports(module: str) -> set[str]:
    """The lorafuse modules `module` imports, anywhere in its code (deferred imports included), resolved
    to modules (a name imported from a package counts as the package, or the submodule it names)."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    known = set(modules())
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known and n != module}
    return found


def test_every_module_belongs_to_a_layer():
    for module in modules():
        layer(module)


@pytest.mark.parametrize("module", modules())
def test_imports_point_down(module):
    up = [other for other in imports(module) if layer(other) > layer(module)]
    assert not up, f"{module} ({LAYERS[layer(module)][0]}) imports {up}, from a higher layer"


def test_no_import_cycles():
    graph = {m: imports(m) for m in modules()}
    # a package's __init__ may hand on names from its own submodules: that is not a loop
    edges = {m: {o for o in targets if not o.startswith(m + ".")} for m, targets in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_each_module_imports_on_its_own():
    """Imported first in a fresh interpreter, each module loads (no cycle hidden by import order)."""
    script = ("import importlib, sys\n"
              "for name in sys.argv[1:]:\n"
              "    for loaded in [m for m in sys.modules if m == 'lorafuse' or m.startswith('lorafuse.')]:\n"
              "        del sys.modules[loaded]\n"
              "    importlib.import_module(name)\n")
    subprocess.run([sys.executable, "-c", script, *modules()], check=True, capture_output=True, text=True)
