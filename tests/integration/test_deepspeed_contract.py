"""The table of DeepSpeed internals agoq relies on (``agoq_ds/deepspeed/contract.py``) is complete and
holds for the installed DeepSpeed, a DeepSpeed change to one of them is reported by name, and those
internals are reached only from the ``agoq_ds/deepspeed`` package."""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

from agoq_ds.deepspeed import contract
from tests.integration.source_imports import imports

ROOT = Path(__file__).resolve().parents[2]


def _own_methods(cls: type) -> set[str]:
    """Methods ``cls`` defines, with those it inherits from agoq mixins that have no fence of their own
    (``OptimizerHost.step`` overrides each optimizer's ``step``)."""
    fenced = {fence.agoq_class for fence in contract.FENCES}
    names: set[str] = set()
    for klass in cls.__mro__:
        path = f"{klass.__module__}.{klass.__qualname__}"
        if klass is cls or (klass.__module__.startswith("agoq_ds.") and path not in fenced):
            names |= {n for n, v in vars(klass).items() if callable(v)}
    return names


def _self_names(cls: type) -> set[str]:
    """Names used as ``self.<name>``, ``super().<name>`` or ``getattr(self, "<name>", ...)`` in the class
    body, agoq's own (``_agoq*``/``agoq_*``, its methods) left out (``super()`` calls its overrides)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    own = _own_methods(cls)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            name = node.attr
        elif isinstance(node, ast.Attribute) and ast.unparse(node.value) == "super()":
            if not node.attr.startswith(("_agoq", "agoq_")):  # agoq's own protocol, through a mixin
                names.add(node.attr)  # a DeepSpeed method even where agoq overrides it
            continue
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("getattr", "hasattr") and node.args:
            target, key = node.args[0], node.args[1] if len(node.args) > 1 else None
            if not (ast.unparse(target) == "self" and isinstance(key, ast.Constant) and isinstance(key.value, str)):
                continue
            name = key.value
        else:
            continue
        if not name.startswith(("_agoq", "agoq_")) and name not in own:
            names.add(name)
    return names


def test_the_installed_deepspeed_provides_everything_listed() -> None:
    import deepspeed

    from agoq_ds._compat import TESTED_DEEPSPEED

    assert contract.DEEPSPEED_VERSION == TESTED_DEEPSPEED[-1]  # one constant, derived
    assert deepspeed.__version__.startswith(contract.DEEPSPEED_VERSION), deepspeed.__version__
    assert contract.check() == []


def test_every_override_and_every_deepspeed_name_is_listed() -> None:
    """Overriding another DeepSpeed method, or reaching for another DeepSpeed attribute, without
    adding it to the table fails here."""
    state: dict[str, set[str]] = {}
    for fence in contract.FENCES:
        agoq, base = contract.load(fence.agoq_class), contract.load(fence.deepspeed_class)
        overridden = {n for n in _own_methods(agoq) if hasattr(base, n) and (n == "__init__" or not n.startswith("__"))}
        assert overridden == set(fence.overrides), f"{fence.agoq_class}: update the table's overrides"
        names = set(fence.state) | set(fence.helpers) | set(fence.overrides)
        state.setdefault(fence.agoq_class.rsplit(".", 1)[0] + "." + agoq.__name__, set()).update(names)
    # The engine mixin serves both engines: its names may sit in either engine's entry.
    mixin = "agoq_ds.deepspeed.engine.AgoqEngineMixin"
    listed = {
        mixin: state[mixin] | state["agoq_ds.deepspeed.engine.AgoqPipelineEngine"],
        **{k: v for k, v in state.items() if k != mixin},
    }
    for path, names in listed.items():
        used = _self_names(contract.load(path))
        missing = used - names
        assert not missing, f"{path} uses DeepSpeed names not in agoq_ds/deepspeed/contract.py: {sorted(missing)}"
    assert sum(len(f.overrides) for f in contract.FENCES) == 48


def test_a_changed_deepspeed_method_is_reported_by_name(monkeypatch) -> None:
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    def average_tensor(self, tensor, communication_data_type):  # a different body under the same name
        return None

    monkeypatch.setattr(DeepSpeedZeroOptimizer, "average_tensor", average_tensor)
    monkeypatch.delattr(DeepSpeedZeroOptimizer, "get_gradient_for_reduction")
    problems = contract.check()
    assert any("DeepSpeedZeroOptimizer.average_tensor changed" in p and "review" in p for p in problems), problems
    assert any("DeepSpeedZeroOptimizer.get_gradient_for_reduction is gone" in p for p in problems), problems


def test_a_changed_decorated_method_is_reported(monkeypatch) -> None:
    """DeepSpeed wraps ZeRO-3 methods in ``instrument_w_nvtx`` (no ``__wrapped__``); the hash is of the
    method inside, so a changed body under the same decorator is still caught."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.utils.nvtx import instrument_w_nvtx

    def partition_grads(self, params_to_release, grad_partitions):  # a different body, same decorator
        return []

    monkeypatch.setattr(DeepSpeedZeroOptimizer_Stage3, "partition_grads", instrument_w_nvtx(partition_grads))
    problems = contract.check()
    assert any("DeepSpeedZeroOptimizer_Stage3.partition_grads changed" in p for p in problems), problems
    assert not any("DeepSpeedZeroOptimizer_Stage3.step changed" in p for p in problems), problems


def test_nothing_outside_the_deepspeed_package_imports_deepspeed_runtime() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / "agoq_ds").rglob("*.py"))
        if (ROOT / "agoq_ds" / "deepspeed") not in path.parents
        for module, line in imports(path)
        if module == "deepspeed.runtime" or module.startswith("deepspeed.runtime.")
    ]
    assert not offenders, "DeepSpeed internals belong in agoq_ds/deepspeed:\n" + "\n".join(offenders)


def test_the_deepspeed_package_has_no_import_cycle() -> None:
    """The engine, the initialize seam and the optimizers import each other one way only (the engine
    module and the integration module imported each other before)."""
    modules = {}
    for path in (ROOT / "agoq_ds").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {
        name: {m for m, _ in imports(path) if m in modules and m != name and not name.startswith(m + ".")}
        for name, path in modules.items()
    }

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                if nxt == goal:
                    return True
                seen.add(nxt)
                todo.append(nxt)
        return False

    ours = [m for m in modules if m.startswith("agoq_ds.deepspeed.")]
    cycles = [(a, b) for a in ours for b in graph[a] if reaches(b, a)]
    assert not cycles, f"import cycles through agoq_ds/deepspeed: {cycles}"
