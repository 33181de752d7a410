"""The DeepSpeed contract (``agoq_ds/deepspeed/contract.py``) has no blind spot a change can slip
through: a new private DeepSpeed name read through any receiver, a changed body of a DeepSpeed helper a
forked method calls, a changed overridden method. Each mutation is made on source text or by
monkeypatching DeepSpeed; no file is edited."""

from __future__ import annotations

import pytest

from agoq_ds.deepspeed import contract


def _source(module: str) -> str:
    return (contract.WING / f"{module}.py").read_text()


def test_the_real_wing_is_covered() -> None:
    assert contract.uncovered() == []
    found = {
        (u.module, u.name) for path in contract.WING.glob("*.py") for u in contract.uses(path.read_text(), path.stem)
    }
    # Names the table missed before it saw other receivers (issue 22), all listed now.
    for module, name in [
        ("engine", "_param_dict"),
        ("engine", "_get_sequence_data_parallel_group"),
        ("zero_optimizer", "_zero_padding"),
        ("bf16_optimizer", "_hp_grad"),
        ("stage3_optimizer", "ds_id"),
        ("stage3_optimizer", "ds_numel"),
        ("stage3_optimizer", "ds_tensor"),
    ]:
        assert (module, name) in found
        assert any(f.name == name and module in f.used_in for f in contract.FOREIGN)


_CURSOR = "\n    cursor = 0\n"
_GROUP = "\n        group = groups._get_sequence_data_parallel_group()\n"
_TOTAL = "\n        total = sum(p.ds_numel for p in params)\n"
_MARK = "\n        lp._hp_grad = self.fp32_groups_gradients[i][j]\n"
_PAD = "\n                pad._zero_padding = True\n"
_CLEAR = "\n            self._clear_previous_reduced_grads()\n"


@pytest.mark.parametrize(
    ("module", "old", "new", "expected"),
    [
        # the case: a private read through the optimizer handed to layout.bucket_layout
        ("layout", _CURSOR, _CURSOR + "    _ = optimizer._param_to_rank\n", "optimizer._param_to_rank"),
        (
            "engine",
            _GROUP,
            _GROUP + "        _ = groups._get_data_parallel_group()\n",
            "groups._get_data_parallel_group",
        ),
        ("stage3_optimizer", _TOTAL, _TOTAL + "        _ = params[0].ds_shape\n", "params[0].ds_shape"),
        ("bf16_optimizer", _MARK, _MARK + "        lp._hp_mapping = None\n", "lp._hp_mapping"),
        # getattr/setattr with a string, the module's mangling prefix included
        (
            "stage3_optimizer",
            _TOTAL,
            _TOTAL + "        _ = getattr(self, _MANGLED + 'ipg')\n",
            "self._DeepSpeedZeroOptimizer_Stage3__ipg",
        ),
        ("zero_optimizer", _PAD, _PAD + "                setattr(pad, '_lp_view', 1)\n", "pad._lp_view"),
        # a private DeepSpeed name through self that the fence does not list
        ("zero_optimizer", _CLEAR, "\n            self._clear_ipg_buckets()\n", "self._clear_ipg_buckets"),
    ],
)
def test_a_new_private_read_is_caught(module: str, old: str, new: str, expected: str) -> None:
    source = _source(module)
    assert old in source, f"{module}.py changed: pick another anchor for this test"
    assert contract.uncovered_in(source, module) == []
    problems = contract.uncovered_in(source.replace(old, new, 1), module)
    assert len(problems) == 1 and f"uses {expected}," in problems[0] and f"{module}.py:" in problems[0], problems


def test_a_name_listed_for_one_module_does_not_cover_another() -> None:
    """``FOREIGN`` says where each name is used: ``ds_id`` read in ``layout.py`` is a new use."""
    source = _source("layout").replace("    cursor = 0\n", "    cursor = 0\n    _ = params[0].ds_id\n", 1)
    assert any("ds_id" in p for p in contract.uncovered_in(source, "layout"))


def test_agoq_own_names_are_not_deepspeed_internals() -> None:
    source = (
        "X = '_y'\n\ndef _helper(a):\n    a._agoq_state = 1\n    a.__class__\n    return _helper.__name__, a._helper\n"
    )
    assert contract.uncovered_in(source, "layout") == []


def test_a_changed_helper_body_is_caught(monkeypatch) -> None:
    """The ZeRO-1/2 epilogue fork calls ``_clear_previous_reduced_grads``; ZeRO-3's calls the mangled
    ``__reduce_and_partition_ipg_grads`` by name; the engine calls a private function of
    ``deepspeed.utils.groups``."""
    import deepspeed.utils.groups as groups
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    def _clear_previous_reduced_grads(self):  # a different body under the same name
        self.previous_reduced_grads = []

    def reduce(self, communication_data_type):
        return None

    monkeypatch.setattr(DeepSpeedZeroOptimizer, "_clear_previous_reduced_grads", _clear_previous_reduced_grads)
    monkeypatch.setattr(
        DeepSpeedZeroOptimizer_Stage3, "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads", reduce
    )

    def _get_sequence_data_parallel_group():
        return None

    monkeypatch.setattr(groups, "_get_sequence_data_parallel_group", _get_sequence_data_parallel_group)
    problems = contract.check()
    expected = [
        "DeepSpeedZeroOptimizer._clear_previous_reduced_grads changed",
        "DeepSpeedZeroOptimizer_Stage3._DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads changed",
        "deepspeed.utils.groups._get_sequence_data_parallel_group changed",
    ]
    for sentence in expected:
        assert any(sentence in p and "review" in p for p in problems), (sentence, problems)
    assert len(problems) == 3, problems


def test_a_helper_listed_as_data_is_caught(monkeypatch) -> None:
    """A DeepSpeed method can't hide in ``state``, unhashed."""
    fence = contract.FENCES[2]
    moved = contract.Fence(
        fence.agoq_class,
        fence.deepspeed_class,
        fence.overrides,
        (*fence.state, "reduce_ipg_grads"),
        {k: v for k, v in fence.helpers.items() if k != "reduce_ipg_grads"},
    )
    monkeypatch.setattr(contract, "FENCES", (*contract.FENCES[:2], moved, *contract.FENCES[3:]))
    assert contract.check() == [
        "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer.reduce_ipg_grads is a "
        "method: list it in helpers, with its hash"
    ]


def test_a_gone_foreign_attribute_is_caught(monkeypatch) -> None:
    """An attribute DeepSpeed sets on a parameter is checked in the source of the module that sets it."""
    monkeypatch.setattr(
        contract,
        "FOREIGN",
        (*contract.FOREIGN, contract.Foreign("ds_nonexistent", "deepspeed.runtime.zero.partition_parameters", ())),
    )
    problems = contract.check()
    assert len(problems) == 1 and "no longer defines or sets .ds_nonexistent" in problems[0], problems


def test_a_changed_overridden_method_is_caught(monkeypatch) -> None:
    """The forked ZeRO-3 epilogue: DeepSpeed's method under the same name (and decorator) with another body."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.utils.nvtx import instrument_w_nvtx

    def independent_gradient_partition_epilogue(self):
        return None

    monkeypatch.setattr(
        DeepSpeedZeroOptimizer_Stage3,
        "independent_gradient_partition_epilogue",
        instrument_w_nvtx(independent_gradient_partition_epilogue),
    )
    problems = contract.check()
    assert len(problems) == 1, problems
    assert "DeepSpeedZeroOptimizer_Stage3.independent_gradient_partition_epilogue changed" in problems[0]
    assert "AgoqStage3Optimizer.independent_gradient_partition_epilogue" in problems[0]


def test_the_hashes_printed_for_a_refresh_are_the_table() -> None:
    printed = contract.hashes()
    for fence in contract.FENCES:
        for name, digest in {**fence.overrides, **fence.helpers}.items():
            assert f'"{name}": "{digest}",' in printed
    assert all(f.digest in printed for f in contract.FOREIGN if f.digest)
