"""Ground floor stays ground floor (issue 22): the layer classes and their default bits, the config,
the planner and the gradient core import (and work) without DeepSpeed, and neither ``config.py`` nor
``activation/`` imports anything from ``agoq_ds/deepspeed``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.integration.source_imports import imports

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "agoq_ds"

GROUND_FLOOR = ("agoq_ds.constants", "agoq_ds.layer_classes", "agoq_ds.pipeline_support")
"""Modules that import nothing of agoq's and nothing of DeepSpeed's."""

GRADIENT_CORE = (
    "agoq_ds.gradient",
    "agoq_ds.gradient.accounting",
    "agoq_ds.gradient.accumulator",
    "agoq_ds.gradient.allreduce",
    "agoq_ds.gradient.check",
    "agoq_ds.gradient.collectives",
    "agoq_ds.gradient.comm",
    "agoq_ds.gradient.host",
    "agoq_ds.gradient.paths",
    "agoq_ds.gradient.store",
)
"""The DeepSpeed-free gradient core (``param_grads`` and ``agoq_ds/deepspeed`` build on it); the
collectives import ``deepspeed.comm`` when they first communicate (``gradient/comm.py``)."""

WITHOUT_DEEPSPEED = (
    "agoq_ds",
    *GROUND_FLOOR,
    "agoq_ds.config",
    "agoq_ds.planner",
    "agoq_ds.activation",
    *GRADIENT_CORE,
)

_BLOCKED = """
import json, sys
for name in [m for m in sys.modules if m == "agoq_ds" or m.startswith("agoq_ds.")]:
    del sys.modules[name]  # the .pth hook imported the package before deepspeed was blocked
sys.modules["deepspeed"] = None  # every `import deepspeed...` now raises ImportError
import importlib
for name in MODULES:
    importlib.import_module(name)

import torch
from agoq_ds.config import AgoqConfigError, parse_agoq_config
from agoq_ds.gradient.accumulator import gradient_accumulator
from agoq_ds.planner import ModelDims, Parallelism, plan

cfg = parse_agoq_config({"activation": {"default_bits": 2, "class_bits": {"mlp_act": 4}}, "gradient": "auto"})
try:
    parse_agoq_config({"activaton": {}})
    raise SystemExit("a misspelt key was accepted")
except AgoqConfigError as exc:
    error = str(exc)
acc = gradient_accumulator(4096, cfg.gradient)
acc.add_(torch.ones(4096))
dims = ModelDims("tiny", vocab=1000, hidden=64, layers=2, heads=4, kv_heads=4, intermediate=128)
print(json.dumps({
    "table": cfg.activation.class_table(),
    "error": error,
    "sum": float(acc.dequantize().sum()),
    "stages": len(plan(dims, Parallelism(seq_len=128, pp=2), cfg)),
    "deepspeed": sorted(m for m in sys.modules if m.startswith("deepspeed")),
    "blocked": sys.modules["deepspeed"] is None,
    "wing": sorted(m for m in sys.modules if m.startswith("agoq_ds.deepspeed")),
}))
"""


def _python(code: str) -> subprocess.CompletedProcess:
    """``code`` run by a fresh interpreter from the repository root; it must succeed."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_config_planner_and_gradient_core_work_without_deepspeed() -> None:
    code = f"MODULES = {list(WITHOUT_DEEPSPEED)!r}\n{_BLOCKED}"
    out = _python(code)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["blocked"] and result["deepspeed"] == ["deepspeed"], result["deepspeed"]
    assert result["wing"] == []  # nothing of agoq_ds/deepspeed was imported either
    assert result["table"]["mlp_act"] == 4 and result["table"]["qkv_input"] == 2
    assert result["table"]["attn_core"] == 8  # DEFAULT_CLASS_BITS from the ground floor
    assert "did you mean 'activation'?" in result["error"]
    assert result["sum"] == 4096.0
    assert result["stages"] == 2


def _path(module: str) -> Path:
    path = ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _is(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_config_and_activation_import_nothing_from_the_deepspeed_package() -> None:
    files = [PACKAGE / "config.py", *sorted((PACKAGE / "activation").rglob("*.py"))]
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in files
        for module, line in imports(path)
        if _is(module, "agoq_ds.deepspeed")
    ]
    assert not offenders, "config.py and activation/ stay below agoq_ds/deepspeed:\n" + "\n".join(offenders)


def test_ground_floor_imports_nothing_of_agoq_or_deepspeed() -> None:
    offenders = [
        f"{module}:{line} imports {imported}"
        for module in GROUND_FLOOR
        for imported, line in imports(_path(module))
        if _is(imported, "agoq_ds") or _is(imported, "deepspeed")
    ]
    assert not offenders, "\n".join(offenders)


def test_gradient_core_imports_deepspeed_only_when_it_runs() -> None:
    """No module-level ``import deepspeed`` in the core (inside a function, e.g. ``check.py``, is fine)."""
    offenders = [
        f"{module}:{line} imports {imported}"
        for module in (*GRADIENT_CORE, "agoq_ds.config", "agoq_ds.planner")
        for imported, line in imports(_path(module), top_level_only=True)
        if _is(imported, "deepspeed") or _is(imported, "agoq_ds.deepspeed")
    ]
    assert not offenders, "\n".join(offenders)


def test_the_lazy_comm_becomes_deepspeed_comm_on_first_use() -> None:
    """After the first call the collectives use ``deepspeed.comm`` itself: no stand-in on the hot path."""
    code = (
        "import agoq_ds.gradient.collectives as c, agoq_ds.gradient.allreduce as a\n"
        "before = type(c.dist).__name__, type(a.dist).__name__\n"
        "c.dist.is_initialized(); a.dist.is_initialized()\n"
        "import deepspeed.comm\n"
        "print(before, c.dist is deepspeed.comm, a.dist is deepspeed.comm)"
    )
    out = _python(code)
    assert out.stdout.strip().splitlines()[-1] == "('LazyComm', 'LazyComm') True True"
