"""The activation packer's rooms stay rooms (issue 22): no import cycle inside ``activation/``, no
import from above it but the ground floor, and ``PackEngine`` stays the small mode switch."""

from __future__ import annotations

import ast
from pathlib import Path

import agoq_ds.activation as activation

PACKAGE = Path(activation.__file__).resolve().parent
GROUND_FLOOR = {"seeding", "layer_classes", "quant", "pipeline_support", "config"}
"""Modules above ``activation/`` it may import: the ground floor (``config`` only for type hints)."""


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(sibling modules imported, modules of the parent package imported) by one module, at runtime
    (``if TYPE_CHECKING:`` blocks left out)."""
    tree = ast.parse(path.read_text())
    siblings: set[str] = set()
    upward: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.ImportFrom) and node.level:
                target = siblings if node.level == 1 else upward
                if node.module:
                    target.add(node.module.split(".")[0])
                else:
                    target.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                for name in names:
                    if name and name.startswith("agoq_ds."):
                        part = name.split(".")[1]
                        (siblings if part == "activation" else upward).add(part)
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    visit([child])

    visit(tree.body)
    return siblings, upward


def test_no_import_cycle_and_no_upward_import() -> None:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        siblings, upward = _imports(path)
        assert upward <= GROUND_FLOOR, f"activation/{path.name} imports {sorted(upward - GROUND_FLOOR)} from above"
        graph[path.stem] = siblings & {p.stem for p in PACKAGE.glob("*.py")}
    assert len(graph) > 10
    state: dict[str, int] = {}

    def walk(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle in activation/: " + " -> ".join([*trail, node, nxt]))
            if nxt not in state:
                walk(nxt, [*trail, node])
        state[node] = 2

    for module in sorted(graph):
        if module != "__init__" and module not in state:
            walk(module, [])


def test_pack_engine_is_a_small_mode_switch() -> None:
    tree = ast.parse((PACKAGE / "hooks.py").read_text())
    (engine,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PackEngine"]
    lines = engine.end_lineno - engine.lineno + 1
    attributes = {
        target.attr
        for node in ast.walk(engine)
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        for target in (target.elts if isinstance(target, ast.Tuple) else [target])
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
    }
    assert lines < 150, f"PackEngine has {lines} lines"
    assert len(attributes) < 15, f"PackEngine sets {len(attributes)} attributes: {sorted(attributes)}"
