"""agoq's activation storage under ``torch.compile`` (``activation/compiled.py``): the hooks are inlined
into the compiled graphs without a graph break, the compiled graphs store quantized values the way
eager agoq decides them, and the gradients carry the quantizer's error, not more."""

from __future__ import annotations

import pytest
import torch

from agoq_ds.activation import ActivationQuantizer
from agoq_ds.activation.compiled_graph import frame_module, normalize_path
from agoq_ds.config import ActivationConfig
from agoq_ds.testing.models import build_llama

from .act_helpers import lm_step, text_batch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for _, g in sorted(grads.items())])


def _rel(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    return float((_flat(got) - _flat(ref)).norm() / _flat(ref).norm())


@pytest.fixture(scope="module")
def compiled_run():
    """One tiny LLaMA: unquantized gradients, eager agoq's, compiled agoq's (fullgraph)."""
    torch._dynamo.reset()
    ids = text_batch(2, 64)
    model = build_llama("tiny", seed=0)
    reference = lm_step(model, ids)
    quantizer = ActivationQuantizer(model, ActivationConfig()).install()
    lm_step(model, ids)  # traced and classified
    quantizer.on_step_end()
    eager = lm_step(model, ids)
    quantizer.on_step_end()
    eager_stats = quantizer.stats()
    packing = quantizer.compiled()
    quantizer.engine.remove()
    compiled_model = torch.compile(model, backend=packing.wrap_backend("inductor"), fullgraph=True)
    with packing.forward():  # fullgraph=True: any graph break raises
        model.zero_grad(set_to_none=True)
        loss = compiled_model(input_ids=ids, labels=ids).loss
    loss.backward()
    packing.backward_done()
    compiled = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    quantizer.on_step_end()
    yield {
        "reference": reference,
        "eager": eager,
        "compiled": compiled,
        "packing": packing,
        "eager_stats": eager_stats,
        "compiled_stats": quantizer.stats(),
    }
    torch._dynamo.reset()


def test_whole_model_compiles_into_one_graph_with_the_hooks_inlined(compiled_run):
    packing = compiled_run["packing"]
    assert len(packing.graphs) == 1 and packing.runs == 1
    assert packing.eager_saved == 0 and not packing.unattributed
    decisions = [entry[0] for entry in packing.graphs[0].entries.values()]
    quantized = [d for d in decisions if d.bits < 16]
    assert len(quantized) >= 8, decisions
    # The classes come from the eager classification through the backward readers' modules; what eager
    # rebuilds by recipes (norm outputs, the gating product: the 4-bit classes) is recomputed, not stored.
    classes = {d.cls for d in quantized}
    assert {"attn_norm_input", "mlp_norm_input", "attn_core", "mlp_act"} <= classes, classes
    assert not classes & {"qkv_input", "mlp_up_input", "down_proj_input"}, classes
    assert packing.rebuilt > 0


def test_compiled_graph_stores_no_more_than_eager_agoq(compiled_run):
    eager, compiled = compiled_run["eager_stats"], compiled_run["compiled_stats"]
    # What the compiled graph saved (its quantized values plus what it keeps, e.g. per-row statistics):
    # within 1.25x of eager agoq's bytes (the graph saves other tensors than eager: Inductor's
    # partitioner picks them), and well under what the compiled graph would hold unquantized.
    assert compiled["stored_bytes_per_forward"] <= 1.25 * eager["stored_bytes_per_forward"]
    assert compiled["stored_bytes_per_forward"] <= 0.30 * compiled["baseline_bytes_per_forward"]


def test_compiled_gradients_carry_the_quantizers_error(compiled_run):
    reference, eager, compiled = compiled_run["reference"], compiled_run["eager"], compiled_run["compiled"]
    eager_error = _rel(reference, eager)
    compiled_error = _rel(reference, compiled)
    assert compiled_error > 0.0  # something was stored quantized
    # The compiled graph stores the same classes at the same 8 bits as eager agoq and rebuilds the
    # 4-bit classes from them, as eager does: the same quantizer error, up to which tensors of a class
    # the partitioner saves (a norm's normalised value or its input). Had it stored the 4-bit classes
    # (absmax step 1/7 of a group's range instead of 1/127) the error would be ~14x eager's (measured).
    assert compiled_error <= 1.5 * eager_error, (compiled_error, eager_error)


def test_paths_of_dynamo_sources_name_modules():
    assert normalize_path("L['self'].model.layers._modules['0'].mlp") == "model.layers.0.mlp"
    assert normalize_path("L['self']._modules['model']._modules['embed_tokens']._parameters['weight']") == (
        "model.embed_tokens.weight"
    )
    # ZeRO-3's frames index parameters by position; frame_module compares the owner before "_parameters".
    assert normalize_path("dict.__getitem__(L['self'].__dict__[") == ""


def test_frame_module_of_a_graph_compiled_from_a_layer():
    """A graph Dynamo compiled from a layer's own forward (as after a graph break) is named by the layer
    its parameters belong to."""
    model = build_llama("tiny", seed=0)
    names = {id(p): n for n, p in model.named_parameters()}
    layer = model.model.layers[1].mlp
    found = []

    def capture(gm, example_inputs):
        found.append(frame_module(gm, names))  # at compile time, as agoq's backend asks
        return gm.forward

    torch._dynamo.reset()
    torch.compile(layer, backend=capture)(torch.randn(1, 4, model.config.hidden_size))
    torch._dynamo.reset()
    assert found == ["model.layers.1.mlp"]


@torch._dynamo.disable
def _eager_gate(h: torch.Tensor) -> torch.Tensor:
    return h * torch.sigmoid(h)  # saves h and sigmoid(h)


class _Broken(torch.nn.Module):
    """Two linear layers around eager code Dynamo does not compile (a graph break) that saves tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(64, 256)
        self.second = torch.nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(_eager_gate(self.first(x)))


def test_eager_code_between_graphs_is_stored_quantized_and_said():
    torch.manual_seed(0)
    model = _Broken()
    x = torch.randn(32, 64)
    model(x).square().mean().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    quantizer = ActivationQuantizer(model, ActivationConfig(min_numel=1024)).install()
    model(x).square().mean().backward()  # traced and classified
    quantizer.on_step_end()
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    quantizer.on_step_end()
    model.zero_grad(set_to_none=True)
    packing = quantizer.compiled()
    quantizer.engine.remove()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=packing.wrap_backend("inductor"))
    with packing.forward():
        out = compiled(x)
    out.square().mean().backward()
    torch._dynamo.reset()
    got = {n: p.grad for n, p in model.named_parameters()}
    assert packing.eager_saved >= 2 and len(packing.graphs) >= 1
    assert any("between compiled graphs" in line for line in packing.news())
    usage = quantizer.engine.ledger.by_module  # this forward's usage, eager holders included
    eager_part = [u for (module, _), u in usage.items() if module == "<no module recorded>"]
    assert eager_part and sum(u.quantized_numel for u in eager_part) >= 2 * 32 * 256
    # Every saved tensor at the same 8 bits as eager agoq stores them (this model has no known class):
    # the same error, up to which tensors each side saves.
    assert _rel(reference, got) <= 1.5 * _rel(reference, eager)


def test_dynamic_shapes_are_quantized_and_counted_at_each_runs_sizes():
    """A dynamic-shape graph (``dynamic=True``: sequence length symbolic) stores quantized, and the ledger
    counts each run at its own sizes: twice the tokens, twice the stored bytes."""
    torch._dynamo.reset()
    model = build_llama("tiny", seed=0)
    quantizer = ActivationQuantizer(model, ActivationConfig()).install()
    lm_step(model, text_batch(2, 32))
    quantizer.on_step_end()
    packing = quantizer.compiled()
    quantizer.engine.remove()
    compiled = torch.compile(model, backend=packing.wrap_backend("inductor"), dynamic=True)
    stored = []
    for seq in (32, 64):
        ids = text_batch(2, seq)
        with packing.forward():
            loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        packing.backward_done()
        stored.append(quantizer.engine.ledger.forwards[-1].stored)
    torch._dynamo.reset()
    assert len(packing.graphs) == 1 and packing.graphs[0].symbols  # one graph, symbolic sizes
    quantized = [e[0] for e in packing.graphs[0].entries.values() if e[0].bits < 16]
    assert len(quantized) >= 8
    assert 1.8 <= stored[1] / stored[0] <= 2.2, stored
