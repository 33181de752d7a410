"""Recipes (``recipe.py``): saved tensors rebuilt in backward from other stored tensors.

Reference: the same model's unquantized backward. With every stored tensor kept exact (16 bits), a
recipe recomputes the very values the forward computed, so gradients must be bit-identical; this
fails if a recipe reads the wrong source, view, parameter or dtype. Then: which tensors of a LLaMA
block are rebuilt, what they cost, and what is never rebuilt.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from agoq_ds.activation import ActivationQuantizer
from agoq_ds.activation.recipe import Recipe, Source, bind_parameters, compose
from agoq_ds.config import ActivationConfig
from agoq_ds.testing.models import build_llama
from tests.activation.act_helpers import lm_step, quantized_grads, text_batch

REBUILT = ("qkv_input", "mlp_up_input", "down_proj_input")
"""Classes of a LLaMA block whose tensors are all recomputed: a norm's output, the gating product."""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("replay", [False, True], ids=["hooks", "replay"])
def test_exact_sources_give_bit_identical_gradients(dtype, replay):
    torch.manual_seed(0)
    model = build_llama("tiny", dtype=dtype).train()
    ids = text_batch(batch=2, seq=64)
    ref = lm_step(model, ids)

    quantizer = ActivationQuantizer(model, ActivationConfig(policy="uniform", default_bits=16)).install()
    quantizer.engine.replay = replay
    for _ in range(3):  # traced, recorded, then replayed (with ``replay``)
        grads = lm_step(model, ids)
        quantizer.on_step_end()
    quantizer.remove()
    by_class = quantizer._current().by_class
    for cls in REBUILT:
        assert by_class[cls].numel > 0 and by_class[cls].derived_numel == by_class[cls].numel, cls
    assert quantizer.engine.replayed == (1 if replay else 0)
    for name, g in ref.items():
        assert torch.equal(grads[name], g), name


def test_llama_block_stores_only_norm_inputs_attention_and_mlp_gate_up():
    """Per block (tiny LLaMA, hidden 128, 2 KV of 4 heads, MLP 344, 2 x 64 tokens): each norm stores its
    input and row statistic, its normalised value and output are rebuilt; the MLP stores the gate and
    up outputs, its SiLU output and gating product are rebuilt."""
    model = build_llama("tiny").train()
    ids = text_batch(batch=2, seq=64)
    grads, quantizer = quantized_grads(model, ids, ActivationConfig())
    tokens, hidden, mlp = 2 * 64, 128, 344
    usage = quantizer._current().by_module
    norm = usage[("model.layers.0.input_layernorm", "attn_norm_input")]
    # input x (fp32), rsqrt (a row statistic), the normalised value: the last one rebuilt
    assert norm.numel == 2 * tokens * hidden + tokens and norm.derived_numel == tokens * hidden
    assert norm.stored == tokens * hidden + tokens * hidden // 128 * 2 + 4 * tokens  # 8-bit x, scales, rsqrt
    act = usage[("model.layers.0.mlp.act_fn", "mlp_act")]
    assert act.numel == tokens * mlp and act.derived_numel == 0  # the gate output, stored
    down = usage[("model.layers.0.mlp.down_proj", "down_proj_input")]
    assert down.numel == down.derived_numel == tokens * mlp and down.stored == 0
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_recomputed_tensors_are_freed_with_their_backward():
    model = build_llama("tiny").train()
    ids = text_batch()
    quantizer = ActivationQuantizer(model, ActivationConfig()).install()
    for _ in range(3):  # traced, recorded, replayed
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        del loss
        gc.collect()
        ledger = quantizer.engine.ledger
        assert ledger.live_stored == 0 and ledger.live_tensors == 0
        quantizer.on_step_end()
    quantizer.remove()


def _lookup(stored: dict[int, torch.Tensor]):
    def lookup(t: torch.Tensor):
        return ("holder", tuple(t.shape), t.stride()) if id(t) in stored else None

    return lookup


def test_compose_builds_trees_and_refuses_what_it_cannot_rebuild():
    x, r = torch.randn(4, 8), torch.randn(4, 1)
    w = nn.Parameter(torch.randn(8))
    lookup = _lookup({id(x): x, id(r): r})
    t = x * r
    recipe, leaves = compose(torch.Tensor.mul, (x, r), {}, t, lookup)
    assert leaves == [("holder", (4, 8), (8, 1)), ("holder", (4, 1), (1, 1))]
    assert torch.equal(recipe([x, r]), t)

    def nested(u: torch.Tensor):
        return (recipe, leaves) if u is t else lookup(u)

    y = w * t
    tree, tree_leaves = compose(torch.Tensor.mul, (w, t), {}, y, nested)
    assert tree.depth == 2 and len(tree_leaves) == 2 and isinstance(tree.args[1], Recipe)
    assert torch.equal(tree([x, r]), y)
    assert isinstance(tree.args[0], nn.Parameter) and isinstance(tree.args[1].args[0], Source)

    assert compose(torch.Tensor.mul, (x, torch.randn(4, 8)), {}, x, lookup) is None  # unknown input
    assert compose(torch.Tensor.mul, (x, 2.0), {"out": x}, x, lookup) is None  # in place
    assert compose(torch.Tensor.to, (x, torch.float32), {}, x, lookup) is None  # returns its input
    chain, prev = (recipe, leaves), t
    for depth in (2, 3, 4):
        out = prev * 2
        chain = compose(torch.Tensor.mul, (prev, 2.0), {}, out, lambda u, c=chain, p=prev: c if u is p else None)
        assert chain is not None and chain[0].depth == depth
        prev = out
    assert torch.equal(chain[0]([x, r]), prev)
    deeper = compose(torch.Tensor.mul, (prev, 2.0), {}, prev * 2, lambda u: chain if u is prev else None)
    assert deeper is None  # deeper than MAX_DEPTH


def test_zero3_parameters_are_copied_in_the_forward():
    """ZeRO-3 may release a parameter's data between the forward and the backward that reads it (its
    first, tracing step releases all of them): a recipe reads a copy taken while the forward has it
    gathered, and none is built while it is released. Other parameters are read in place."""
    x = torch.randn(4, 8)
    p = nn.Parameter(torch.ones(8))
    plain, _ = compose(torch.Tensor.mul, (p, x), {}, p * x, _lookup({id(x): x}))
    assert not plain.partitioned and bind_parameters(plain) is plain
    p.ds_id, p.ds_numel = 0, 8  # what DeepSpeed's ZeRO-3 sets on its parameters
    recipe, _ = compose(torch.Tensor.mul, (p, x), {}, p * x, _lookup({id(x): x}))
    assert recipe.partitioned and recipe.args[0] is p  # the plan keeps the parameter itself
    bound = bind_parameters(recipe)
    assert bound.args[0] is not p and torch.equal(bound.args[0], p.detach())
    released = p.data
    p.data = torch.empty(0)  # how ZeRO-3 releases a parameter
    assert bind_parameters(recipe) is None
    assert torch.equal(bound([x]), released * x)  # the copy outlives the release


def test_recompute_off_stores_every_tensor():
    model = build_llama("tiny").train()
    ids = text_batch()
    _, quantizer = quantized_grads(model, ids, ActivationConfig(recompute=False))
    by_class = quantizer._current().by_class
    assert all(u.derived_numel == 0 for u in by_class.values())
    assert all(by_class[c].stored > 0 for c in REBUILT)


def test_a_recipe_runs_under_the_autocast_of_its_op():
    """Autocast changes what some elementwise ops compute (CUDA runs ``softplus`` of fp16 in fp32); a
    recipe replays the autocast state its op ran under, and none outside it."""
    x = torch.randn(4, 8)
    seen = []

    def op(t: torch.Tensor) -> torch.Tensor:
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return t * 2

    lookup = _lookup({id(x): x})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recipe, _ = compose(op, (x,), {}, op(x), lookup)
    plain, _ = compose(op, (x,), {}, op(x), lookup)
    recipe([x])
    plain([x])
    assert recipe.autocast == (("cpu", torch.bfloat16),) and plain.autocast == ()
    assert seen == [torch.bfloat16, False, torch.bfloat16, False]
