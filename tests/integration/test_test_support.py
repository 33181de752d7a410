"""Test support stays outside the runtime (issue 22, part 6): what tests, benchmarks and examples share
lives in ``agoq_ds/testing``, which the rest of ``agoq_ds`` never imports, and the tests import their
helpers as modules (``agoq_ds.testing.*``, ``tests.<folder>.<helper>``), never by editing
``sys.path`` or loading a file by its path."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

from tests.integration.source_imports import ROOT, imports

PACKAGE = ROOT / "agoq_ds"
TESTING = PACKAGE / "testing"

BY_PATH = {"spec_from_file_location", "module_from_spec", "SourceFileLoader", "SourcelessFileLoader"}
"""importlib's ways to run a file as a module without importing it by name."""


def _is_testing(module: str) -> bool:
    return module == "agoq_ds.testing" or module.startswith("agoq_ds.testing.")


def test_the_runtime_does_not_import_agoq_ds_testing() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if TESTING not in path.parents
        for module, line in imports(path)
        if _is_testing(module)
    ]
    assert not offenders, "agoq_ds/testing is for tests, benchmarks and examples:\n" + "\n".join(offenders)


def test_importing_the_runtime_loads_nothing_of_agoq_ds_testing() -> None:
    code = (
        "import json, sys\n"
        "import agoq_ds, agoq_ds.activation, agoq_ds.cli, agoq_ds.config, agoq_ds.deepspeed, agoq_ds.gradient\n"
        "import agoq_ds.planner, agoq_ds.quant\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('agoq_ds.testing'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def path_edits(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` for each use of ``sys.path`` and of importlib's load-a-file-by-path functions
    in ``source`` (read from its syntax tree: a docstring that names them does not count)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name):
            if node.value.id == "sys":
                found.append((node.lineno, "sys.path"))
        if isinstance(node, ast.Attribute) and node.attr in BY_PATH:
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.Name) and node.id in BY_PATH:
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.ImportFrom):
            names = {a.name for a in node.names}
            if node.module == "sys" and "path" in names:
                found.append((node.lineno, "from sys import path"))
            found += [(node.lineno, name) for name in sorted(names & BY_PATH)]
    return sorted(found)


def test_the_check_sees_path_edits() -> None:
    assert path_edits("import sys\nsys.path.insert(0, 'x')\n") == [(2, "sys.path")]
    assert path_edits("import sys\nsys.path[:0] = ['x']\n") == [(2, "sys.path")]
    assert path_edits("from sys import path\npath.append('x')\n") == [(1, "from sys import path")]
    loader = "import importlib.util\nspec = importlib.util.spec_from_file_location('m', 'm.py')\n"
    assert path_edits(loader) == [(2, "spec_from_file_location")]
    assert path_edits("from importlib.util import module_from_spec\n") == [(1, "module_from_spec")]
    assert path_edits('"""No sys.path edits, no spec_from_file_location."""\nimport os.path\n') == []


def test_tests_edit_no_sys_path_and_load_no_file_by_path() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line} {what}"
        for path in sorted((ROOT / "tests").rglob("*.py"))
        for line, what in path_edits(path.read_text())
    ]
    assert not offenders, (
        "import test helpers by name (agoq_ds.testing.*, tests.<folder>.<module>, benchmarks.<script>):\n"
        + "\n".join(offenders)
    )
