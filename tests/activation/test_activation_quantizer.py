"""The ActivationQuantizer API end to end: budget mode (calibration, target, determinism), state
round trip, report and statistics, and the default policy's <= 4.5 bits on a LLaMA block."""

from __future__ import annotations

import io

import pytest
import torch

from agoq_ds.activation import ActivationQuantizer, LayerClass
from agoq_ds.config import ActivationConfig
from agoq_ds.testing.models import build_llama
from tests.activation.act_helpers import text_batch


def _train(model, quantizer, ids, steps):
    stats = []
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        quantizer.on_step_end()
        stats.append(quantizer.stats())
    return stats


def _budget_run(config: ActivationConfig):
    model = build_llama("tiny", seed=0).train()
    quantizer = ActivationQuantizer(model, config).install()
    stats = _train(model, quantizer, text_batch(), 2)
    quantizer.remove()
    return quantizer, stats


def test_budget_target_avg_bits_is_met_and_deterministic():
    config = ActivationConfig(budget={"target_avg_bits": 4.0})
    first, stats = _budget_run(config)
    # calibration step: nothing quantized (only the recomputed activation outputs store nothing)
    assert first._snapshot is not None
    assert stats[0]["avg_bits"] > 16
    assert 3.5 < stats[1]["avg_bits"] <= 4.0
    assert first.decisions and "budget mode" in first.decisions[0]
    table = first.table()
    assert table["attn_core"] == table["attn_value"] == 8  # the policy's sensitive classes fit
    # ... so another class the policy keeps at 8 bits had to give
    assert any(table[c] < 8 for c in ("attn_norm_input", "mlp_norm_input", "mlp_act"))
    # classes recomputed from others' tensors follow their sources (they would otherwise raise them)
    assert table["qkv_input"] == table["mlp_up_input"] == table["down_proj_input"] == 2
    second, stats2 = _budget_run(config)
    assert second.table() == table and second.sensitivity == first.sensitivity
    assert stats2[1]["stored_bytes_per_forward"] == stats[1]["stored_bytes_per_forward"]


def test_budget_bytes():
    _, free = _budget_run(ActivationConfig(policy="uniform", default_bits=16))
    budget = int(0.12 * free[0]["baseline_bytes_per_forward"])
    quantizer, stats = _budget_run(ActivationConfig(budget={"stage_budget_bytes": budget}))
    assert quantizer.holds == 1
    assert stats[1]["stored_bytes_per_forward"] <= budget
    assert stats[1]["stored_bytes_peak"] <= budget


def test_state_dict_round_trip_without_recalibration():
    first, _ = _budget_run(ActivationConfig(budget={"target_avg_bits": 4.0}))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    model = build_llama("tiny", seed=0).train()
    restored = ActivationQuantizer(model, ActivationConfig(budget={"target_avg_bits": 4.0}))
    restored.load_state_dict(state)
    restored.install()
    stats = _train(model, restored, text_batch(), 1)
    restored.remove()
    assert restored.table() == first.table() and restored.sensitivity == first.sensitivity
    assert stats[0]["avg_bits"] <= 4.0  # quantized from the first step: no new calibration
    with pytest.raises(ValueError, match="version"):
        restored.load_state_dict({**state, "version": 99})


def test_report_stats_and_table():
    model = build_llama("tiny").train()
    quantizer = ActivationQuantizer(model, ActivationConfig(), log_report=True).install()
    assert "step 0" in quantizer.report()  # readable before anything ran
    _train(model, quantizer, text_batch(), 2)
    quantizer.remove()
    table = quantizer.table()
    assert set(table) == {c.value for c in LayerClass}
    stats = quantizer.stats()
    for key in ("stored_bytes_peak", "baseline_bytes_peak", "avg_bits", "compression", "class/mlp_act/avg_bits"):
        assert key in stats
    assert stats["compression"] == pytest.approx(
        stats["baseline_bytes_per_forward"] / stats["stored_bytes_per_forward"]
    )
    text = quantizer.report()
    for cls in ("attn_core", "attn_value", "mlp_act", "total", "peak live"):
        assert cls in text
    modules = quantizer.stats(per_module=True)
    assert modules["module/model.layers.1.mlp.act_fn/mlp_act/elements"] == 2 * 64 * 344
    assert (
        sum(v for k, v in modules.items() if k.startswith("module/") and k.endswith("/stored_bytes"))
        == (stats["stored_bytes_per_forward"])
    )
    layered = quantizer.report(per_layer=True)
    assert "model.layers.0" in layered and "model.layers.1" in layered and "<outside layers>" in layered


SHAPES_OF_ISSUE_13 = {
    "10m": {},  # the CPU convergence model: hidden 384, 6 of 2 KV heads, MLP 1024
    "76m": dict(hidden_size=768, num_attention_heads=12, num_key_value_heads=4, intermediate_size=2048),
}
"""The two models issue 13 sets the <= 4.5 bits target on (the 76M one with 2 of its 12 layers)."""


@pytest.mark.parametrize("shape", sorted(SHAPES_OF_ISSUE_13))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_default_policy_at_most_4_5_bits_on_a_llama_block(dtype, shape):
    """Every saved element counted (recomputed ones at 0 bits), 2 layers, 256 tokens. With full
    multi-head attention (8 KV heads of 8) the same policy stores 4.50 bits per element of a block."""
    model = build_llama("10m", dtype=dtype, num_hidden_layers=2, **SHAPES_OF_ISSUE_13[shape]).train()
    ids = text_batch(batch=1, seq=256)
    quantizer = ActivationQuantizer(model, ActivationConfig()).install()
    _train(model, quantizer, ids, 2)
    quantizer.remove()
    by_layer: dict[str, list] = {}
    for (module, _), usage in quantizer._current().by_module.items():
        layer = quantizer._layer_of(module)
        if layer:
            by_layer.setdefault(layer, []).append(usage)
    assert set(by_layer) == {"model.layers.0", "model.layers.1"}
    stored = sum(u.stored for us in by_layer.values() for u in us)
    numel = sum(u.numel for us in by_layer.values() for u in us)
    assert 8 * stored / numel <= 4.5
    for layer, usages in by_layer.items():
        bits = 8 * sum(u.stored for u in usages) / sum(u.numel for u in usages)
        assert 3.5 < bits <= 4.5, layer
    assert quantizer.stats()["avg_bits"] <= 4.5
    # and the whole model (embeddings/head/loss included) against what bf16 would hold
    assert quantizer.stats()["ratio_vs_bf16"] <= 0.30
