"""The package's structure: every module imports only from its own layer or below, and no import cycle exists."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bricks"

# Lowest first (shared/DESIGN.md). A module may import from its own layer or a lower one; the domain packages
# in the middle are ordered too, so that none of them reaches into one listed after it.
LAYERS = [
    ["errors", "io", "registry"],
    ["arch", "corpora", "data"],
    ["loading"],
    ["runtime", "decoding"],
    ["training"],
    ["brick"],
    ["analysis"],
    ["adapters"],
    ["merge"],
    ["routing"],
    ["fusion"],
    ["compress"],
    ["configured", "evaluate"],
    ["cli"],
    ["__init__"],
]
LAYER_OF = {name: i for i, group in enumerate(LAYERS) for name in group}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Modules of the package that `path` imports, anywhere in the file (function-level imports included)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from . import x` and `from .pkg import mod` name modules; `from .mod import f` names a module's member.
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
        else:
            continue
        found.update(t for t in targets if t == "bricks" or t.startswith("bricks."))
    return {t for t in found if t in known and t != name}


def layer(name: str) -> int:
    parts = name.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    assert key in LAYER_OF, f"{name} is in no layer: add it to LAYERS (and to shared/DESIGN.md's layout)"
    return LAYER_OF[key]


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(path, name, known) for name, path in mods.items()}


def upward(g: dict[str, set[str]]) -> list[str]:
    # A package's __init__ re-exporting its own modules is not an upward import.
    return sorted(f"{a} imports {b}" for a, deps in g.items() for b in deps
                  if layer(b) > layer(a) and not b.startswith(a + "."))


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    # A package's __init__ importing its own modules is re-export, not a dependency of theirs on it.
    g = {a: {b for b in deps if not (a == "bricks" or b.startswith(a + "."))} for a, deps in g.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)
    return found


def test_every_import_points_down():
    bad = upward(graph())
    assert not bad, "imports that point up a layer:\n" + "\n".join(bad)


def test_no_import_cycle():
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_checks_see_an_upward_import_and_a_cycle(tmp_path):
    """The two tests above can fail: a function-level upward import is read, and a cycle is found."""
    known = set(modules())
    (tmp_path / "bricks" / "analysis").mkdir(parents=True)
    inner = tmp_path / "bricks" / "analysis" / "x.py"
    inner.write_text("def f():\n    from ..routing.recovery import recover\n")
    assert imports(inner, "bricks.analysis.x", known) == {"bricks.routing.recovery"}
    assert upward({"bricks.analysis.x": {"bricks.routing.recovery"}}) == ["bricks.analysis.x imports bricks.routing.recovery"]
    assert cycles({"bricks.routing.a": {"bricks.routing.b"}, "bricks.routing.b": {"bricks.routing.a"}})
    assert not cycles({"bricks.routing.a": {"bricks.routing.b"}, "bricks.routing.b": set()})


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_above_400_lines(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= 400, f"{name} has {lines} lines: split it by concept"
