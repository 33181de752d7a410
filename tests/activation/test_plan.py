"""Per-forward plan replay (``activation/plan.py``) against the per-module hooks it replaces.

A replayed forward must store exactly what a forward run with the hooks stores: the same spans, bits,
classes and rounding seeds, hence bit-identical gradients and the same byte accounting. The
reference is the same quantizer with ``engine.replay = False`` (every forward traced by the hooks),
run on the same model from the same weights and batches.
"""

from __future__ import annotations

import gc
import logging

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from agoq_ds.activation import ActivationQuantizer, hooks, storage
from agoq_ds.activation.plan import Replay
from agoq_ds.activation.recipe import Recipe
from agoq_ds.activation.storage import DerivedTensor, SavedView
from agoq_ds.config import ActivationConfig
from agoq_ds.testing.models import build_llama
from tests.activation.act_helpers import lm_step, text_batch

STEPS = 4
"""Traced, recorded, then two replayed steps."""


def _run(config: ActivationConfig, replay: bool, batches: list[torch.Tensor], checkpointing: bool = False):
    model = build_llama("tiny", seed=0).train()
    quantizer = ActivationQuantizer(model, config)
    quantizer.engine.replay = replay
    quantizer.install()
    if checkpointing:
        quantizer.enable_hf_gradient_checkpointing()
    grads, stats = [], []
    for ids in batches:
        grads.append(lm_step(model, ids))
        assert quantizer.engine.ledger.live_stored == 0  # every holder freed by backward
        quantizer.on_step_end()
        stats.append(quantizer.stats(per_module=True))
    return grads, stats, quantizer


CONFIGS = {
    "default": ActivationConfig(min_numel=0),
    "stochastic": ActivationConfig(min_numel=0, rounding="stochastic"),
    "no_recompute": ActivationConfig(min_numel=0, recompute=False, default_bits=2),
}


@pytest.mark.parametrize("name", [*CONFIGS, "checkpointing"])
def test_replay_matches_hooks_bit_for_bit(name: str) -> None:
    config = CONFIGS.get(name, ActivationConfig(min_numel=0))
    batches = [text_batch(batch=2, seq=32, offset=97 * i) for i in range(STEPS)]
    checkpointing = name == "checkpointing"
    ref_grads, ref_stats, ref = _run(config, False, batches, checkpointing)
    grads, stats, quantizer = _run(config, True, batches, checkpointing)
    assert ref.engine.replayed == 0 and len(ref.engine.plans) == 0
    assert quantizer.engine.replayed == STEPS - 2, "steps 3 and 4 should follow the plan recorded in step 2"
    assert not quantizer.engine.recorder.hooks_installed, "a replayed forward runs without per-module hooks"
    for step in range(STEPS):
        assert stats[step] == ref_stats[step], f"byte accounting differs at step {step + 1}"
        for n, g in ref_grads[step].items():
            assert torch.equal(grads[step][n], g), f"{n} differs at step {step + 1}"
    assert stats[-1]["compression"] > 3  # fp32 tensors stored at <= 8 bits: quantization really happened


def test_each_input_shape_gets_its_own_plan() -> None:
    config = ActivationConfig(min_numel=0)
    batches = [text_batch(batch=2, seq=seq, offset=31 * i) for i, seq in enumerate([32, 32, 48, 32, 48, 48])]
    ref_grads, ref_stats, _ = _run(config, False, batches)
    grads, stats, quantizer = _run(config, True, batches)
    assert len(quantizer.engine.plans) == 2
    assert quantizer.engine.replayed == 3  # steps 4, 5, 6 (2 and 3 recorded a plan each)
    for step in range(len(batches)):
        assert stats[step] == ref_stats[step]
        for n, g in ref_grads[step].items():
            assert torch.equal(grads[step][n], g), f"{n} differs at step {step + 1}"


class _Switchable(nn.Module):
    """A model whose code path depends on an attribute the plan key cannot see."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.extra = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if self.extra:
            h = h * torch.sigmoid(h)
        return self.b(h).square().mean()


def _grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_forward_departing_from_its_plan_is_kept_exact_then_recorded_again(caplog) -> None:
    torch.manual_seed(0)
    model = _Switchable()
    x = torch.randn(32, 64)
    quantizer = ActivationQuantizer(model, ActivationConfig(min_numel=0, policy="uniform", default_bits=2)).install()
    for _ in range(3):
        _grads(model, x)
        quantizer.on_step_end()
    assert quantizer.engine.replayed == 1
    model.extra = True
    quantizer.engine.recorder.enabled = False
    exact = _grads(model, x)
    quantizer.engine.recorder.enabled = True
    with caplog.at_level(logging.INFO, logger="agoq_ds.activation"):
        departed = _grads(model, x)
    assert "departs from the recorded plan" in caplog.text
    assert len(quantizer.engine.plans) == 0 and quantizer.engine.replayed == 1
    # Everything saved from the departure on is kept as it is: the gradient of ``b`` (its input
    # saved after the extra ops) is exact, while ``a``'s input (saved before) is still 2-bit.
    assert torch.equal(departed["b.weight"], exact["b.weight"])
    assert not torch.equal(departed["a.weight"], exact["a.weight"])
    assert quantizer.engine.ledger.live_stored == 0
    quantizer.on_step_end()
    _grads(model, x)  # recorded again
    quantizer.on_step_end()
    replayed = _grads(model, x)
    assert quantizer.engine.replayed == 2 and len(quantizer.engine.plans) == 1
    quantizer.engine.replay = False
    hooked = _grads(model, x)
    for n, g in hooked.items():
        assert torch.equal(replayed[n], g)


def _replaying() -> tuple[nn.Module, ActivationQuantizer, torch.Tensor]:
    """A tiny LLaMA after three steps (traced, recorded, replayed) on one batch."""
    model = build_llama("tiny", seed=0).train()
    quantizer = ActivationQuantizer(model, ActivationConfig(min_numel=0)).install()
    ids = text_batch(batch=2, seq=32)
    for _ in range(3):
        lm_step(model, ids)
        quantizer.on_step_end()
    return model, quantizer, ids


def test_eval_and_no_grad_forwards_leave_plans_alone() -> None:
    model, quantizer, ids = _replaying()
    with torch.no_grad():
        model(input_ids=ids)
    assert not quantizer.engine.recorder.hooks_installed  # nothing installed for a forward that saves nothing
    model.eval()
    lm_step(model, ids)  # a grad forward in eval mode: its own plan
    model.train()
    lm_step(model, ids)
    assert len(quantizer.engine.plans) == 2 and quantizer.engine.replayed == 2


def test_changed_bits_invalidate_plans() -> None:
    model, quantizer, ids = _replaying()
    assert len(quantizer.engine.plans) == 1
    before = quantizer.stats()["avg_bits"]
    state = quantizer.state_dict()
    state["class_bits"] = {c: 2 for c in state["class_bits"]}
    quantizer.load_state_dict(state)
    assert len(quantizer.engine.plans) == 0
    lm_step(model, ids)
    quantizer.on_step_end()
    assert quantizer.stats()["avg_bits"] < before - 2  # recorded at the new widths


def _recipe_cost(holder: DerivedTensor) -> int:
    """Upper bound on the ops of evaluating ``holder`` once: each recipe node (a cast may copy twice),
    a layout copy, a dequantize per stored source, recomputed sources likewise."""

    def nodes(value) -> int:
        if isinstance(value, Recipe):
            return 2 + sum(nodes(a) for a in (*value.args, *value.kwargs.values()))
        return 0

    cost = nodes(holder.recipe) + 1
    for view in holder.sources:
        cost += _recipe_cost(view.holder) if isinstance(view.holder, DerivedTensor) else 1
    return cost


_FREE_OPS = frozenset(
    {"detach", "permute", "view", "as_strided", "empty", "empty_strided", "new_empty", "alias", "_unsafe_view", "t"}
    | {"transpose", "expand", "reshape", "unsqueeze", "squeeze", "slice", "select", "lift_fresh"}
)
"""Aten ops that launch nothing: views and allocations."""


class _ComputeOps(TorchDispatchMode):
    """Names of the aten ops that compute (launch a kernel on a GPU) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _FREE_OPS:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def test_replayed_pack_and_unpack_launch_one_kernel_each(monkeypatch) -> None:
    """A replayed pack of a quantized span is one quantize kernel and nothing else, its unpack one
    dequantize kernel (log-probabilities add their exp/log, a recomputed span its recipe)."""
    model = build_llama("tiny", seed=0).train()
    quantizer = ActivationQuantizer(model, ActivationConfig(min_numel=0)).install()
    engine = quantizer.engine
    ids = text_batch(batch=2, seq=32)
    for _ in range(2):
        lm_step(model, ids)
        quantizer.on_step_end()
    seen: dict[int, dict] = {}
    current: list[dict] = []

    def entry(holder) -> dict:
        return seen.setdefault(id(holder), {"holder": holder, "kernels": [0, 0], "ops": [[], []], "unpacks": 0})

    def counted(kernel, side: int):
        def run(*args, **kwargs):
            if current:
                current[-1]["kernels"][side] += 1
            return kernel(*args, **kwargs)

        return run

    monkeypatch.setattr(storage, "quantize", counted(storage.quantize, 0))
    monkeypatch.setattr(storage, "dequantize", counted(storage.dequantize, 1))
    real_pack, real_unpack = Replay.pack, hooks.unpack_saved

    def pack(self, t):
        probe = {"kernels": [0, 0], "ops": [[], []]}
        current.append(probe)
        with _ComputeOps() as mode:
            packed = real_pack(self, t)
        current.pop()
        if isinstance(packed, SavedView):
            e = entry(packed.holder)
            e["kernels"][0] += probe["kernels"][0]
            e["ops"][0] += mode.ops
        else:
            assert not mode.ops and not probe["kernels"][0], "a tensor kept as it is costs nothing"
        return packed

    def unpack(packed):
        if not isinstance(packed, SavedView):
            return real_unpack(packed)
        e = entry(packed.holder)
        current.append(e)
        with _ComputeOps() as mode:
            out = real_unpack(packed)
        current.pop()
        e["ops"][1] += mode.ops
        e["unpacks"] += 1
        return out

    monkeypatch.setattr(Replay, "pack", pack)
    monkeypatch.setattr(hooks, "unpack_saved", unpack)
    lm_step(model, ids)
    assert engine.replayed == 1
    quantized = 0
    for e in seen.values():
        holder, (pack_kernels, unpack_kernels), (pack_ops, unpack_ops) = e["holder"], e["kernels"], e["ops"]
        assert e["unpacks"] >= 1
        if isinstance(holder, DerivedTensor):
            # Nothing at pack time; at unpack, the recipe once (its ops, a layout copy, a dequantize per
            # stored source, the same for recomputed sources not computed yet), however often unpacked.
            assert pack_kernels == 0 and not pack_ops
            assert unpack_kernels <= len(holder.stored_leaves())
            assert len(unpack_ops) <= _recipe_cost(holder), unpack_ops
            continue
        if holder.bits >= 16:
            assert pack_kernels == unpack_kernels == 0 and not pack_ops and not unpack_ops
            continue
        quantized += 1
        assert pack_kernels == 1, "one quantize kernel per pack"
        # Read by its own unpacks and by recipes over it, a span is dequantized once (by whichever
        # read comes first: a recipe's dequantize counts under the recomputed holder).
        assert unpack_kernels <= 1, "a span is dequantized once, however often it is read"
        # The kernels go through the dispatcher (``agoq::quantize``/``agoq::dequantize``), once each.
        assert pack_ops.count("quantize") == pack_kernels and unpack_ops.count("dequantize") == unpack_kernels
        extra = {"_to_copy", "exp", "log"} if holder.log_space else set()
        others = [op for op in pack_ops + unpack_ops if op not in ("quantize", "dequantize")]
        assert set(others) <= extra, (pack_ops, unpack_ops)
    assert quantized >= 20  # the tiny LLaMA stores dozens of quantized spans
    dequantized = sum(e["kernels"][1] for e in seen.values())
    assert dequantized == quantized, f"{dequantized} dequantize kernels for {quantized} stored spans"


HOLDER_TYPES = (DerivedTensor, storage.SavedTensor)


@pytest.mark.parametrize("replay", [True, False], ids=["replayed", "hooks"])
def test_backward_frees_each_layers_spans_once_it_is_done(replay: bool) -> None:
    """As stock autograd frees a saved tensor after its last use, a stored span and a recomputed
    result die once their layer's backward has run, not when the whole backward is over (a replay
    that held its holders kept every recomputed tensor of the model alive through backward)."""
    model = build_llama("tiny", seed=0).train()
    quantizer = ActivationQuantizer(model, ActivationConfig(min_numel=0))
    quantizer.engine.replay = replay
    quantizer.install()
    ids = text_batch(batch=2, seq=32)
    for _ in range(2):  # traced, then recorded: the third forward replays
        lm_step(model, ids)
        quantizer.on_step_end()
    layers = model.model.layers
    later = tuple(f"layers.{k}." for k in range(1, len(layers)))
    ledger = quantizer.engine.ledger
    seen: dict[str, int] = {}

    def ours() -> list:
        return [o for o in gc.get_objects() if type(o) in HOLDER_TYPES and o.ledger is ledger]

    def after_layer_zero(*_: object) -> None:
        holders = ours()
        seen["later"] = sum(any(s in h.module for s in later) for h in holders)
        seen["results"] = sum(isinstance(h, DerivedTensor) and h._result is not None for h in holders)

    gc.collect()
    assert not ours(), "holders of an earlier step are still alive"
    handle = layers[0].register_full_backward_hook(after_layer_zero)
    lm_step(model, ids)
    handle.remove()
    assert quantizer.engine.replayed == (1 if replay else 0)
    assert seen["later"] == 0, f"{seen['later']} spans of layers 1.. outlived their layer's backward"
    assert seen["results"] <= 2, f"{seen['results']} recomputed results still held (layer 0's MLP at most)"


def test_alias_check_needs_the_same_live_storage() -> None:
    """A planned view of an earlier span matches only the span's own storage while it lives, not a
    later tensor that the allocator placed at the freed address."""
    _, quantizer, _ = _replaying()
    (plan,) = quantizer.engine.plans._plans.values()
    replay = Replay(plan, (), quantizer.engine.ledger, quantizer.engine.spec, lambda n: 0)
    t = torch.randn(4096)
    number = replay.storages.number(t)
    assert replay.storages.alive(number, t[10:20])
    del t
    later = torch.randn(4096)  # often at the same address on CPU allocators; never the same storage
    assert not replay.storages.alive(number, later)
