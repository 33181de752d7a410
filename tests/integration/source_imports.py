"""What a source file of the repository imports, read from its syntax tree (for the import-boundary
tests: ``test_deepspeed_contract.py``, ``test_ground_floor.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository root."""


def module_name(path: Path) -> str:
    """The dotted module name of a file below ``ROOT`` (a package's ``__init__`` is the package)."""
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path, *, top_level_only: bool = False) -> list[tuple[str, int]]:
    """Absolute module names ``path`` imports (relative imports resolved; ``from x import y`` gives
    ``x`` and ``x.y``), with line numbers; anywhere in the file (functions included), or only in its
    top-level statements."""
    package = module_name(path).split(".")
    package = package if path.name == "__init__.py" else package[:-1]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found += [(module, node.lineno), *((f"{module}.{a.name}", node.lineno) for a in node.names)]
    return found
