"""The table of DeepSpeed internals agoq relies on (``agoq_ds/deepspeed_contract.py``) is complete and
holds for the installed DeepSpeed, and a DeepSpeed change to one of them is reported by name."""

from __future__ import annotations

import ast
import inspect
import textwrap

from agoq_ds import deepspeed_contract as contract


def _own_methods(cls: type) -> set[str]:
    return {n for n, v in vars(cls).items() if callable(v)}


def _self_names(cls: type) -> set[str]:
    """Names used as ``self.<name>`` in the class body, agoq's own (``_agoq*``/``agoq_*``, its methods) left out."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    own = _own_methods(cls)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            if not node.attr.startswith(("_agoq", "agoq_")) and node.attr not in own:
                names.add(node.attr)
    return names


def test_the_installed_deepspeed_provides_everything_listed() -> None:
    import deepspeed

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
        state.setdefault(fence.agoq_class.rsplit(".", 1)[0] + "." + agoq.__name__, set()).update(fence.state)
    # The engine mixin serves both engines: its names may sit in either engine's entry.
    mixin = "agoq_ds.engine.AgoqEngineMixin"
    listed = {
        mixin: state[mixin] | state["agoq_ds.engine.AgoqPipelineEngine"],
        **{k: v for k, v in state.items() if k != mixin},
    }
    for path, names in listed.items():
        used = _self_names(contract.load(path))
        missing = used - names
        assert not missing, f"{path} uses DeepSpeed names not in agoq_ds/deepspeed_contract.py: {sorted(missing)}"
    assert sum(len(f.overrides) for f in contract.FENCES) == 43


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
