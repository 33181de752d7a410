"""Bit policy resolution (class table -> rules -> overrides) and the allocators on their own."""

from __future__ import annotations

import pytest

from agoq_ds.activation.allocate import (
    StagePlan,
    allocate_budget,
    balance_stages,
    error,
    pipeline_holds,
    spread,
)
from agoq_ds.activation.calibration import Unit
from agoq_ds.activation.policy import BitPolicy
from agoq_ds.config import ActivationConfig


def test_class_table_rules_exclude_and_overrides():
    cfg = ActivationConfig(
        class_bits={"mlp_act": 2},
        rules=[
            {"class": "qkv_input", "bits": 8},
            {"module": "model.layers.0.*", "bits": 16},
            {"class": "qkv_input", "module": "model.layers.0.*", "bits": 2},  # later rule wins
            {"stage": 1, "class": "down_proj_input", "bits": 8},
        ],
        exclude=["lm_head"],
    )
    stage0, stage1 = BitPolicy(cfg, 0), BitPolicy(cfg, 1)
    assert stage0.bits("model.layers.3.mlp", "mlp_act") == 2  # class_bits
    assert stage0.bits("model.layers.3.mlp", "attn_core") == 8  # agoq table
    assert stage0.bits("model.layers.3.mlp.up_proj", "mlp_up_input") == 4  # default_bits
    assert stage0.bits("model.layers.3.self_attn.q_proj", "qkv_input") == 8
    assert stage0.bits("model.layers.0.mlp", "mlp_act") == 16
    assert stage0.bits("model.layers.0.self_attn.q_proj", "qkv_input") == 2
    assert stage0.bits("lm_head", "embedding") == 16
    assert stage0.bits("model.layers.5.mlp.down_proj", "down_proj_input") == 4
    assert stage1.bits("model.layers.5.mlp.down_proj", "down_proj_input") == 8
    assert stage0.table()["qkv_input"] == 8 and stage0.table()["mlp_act"] == 2
    # automatic overrides never beat the user's rules
    stage0.set_overrides({("model.layers.0.mlp", "mlp_act"): 2, ("model.layers.3.mlp", "mlp_act"): 8})
    assert stage0.bits("model.layers.0.mlp", "mlp_act") == 16
    assert stage0.bits("model.layers.3.mlp", "mlp_act") == 8
    assert stage0.pinned_bits("model.layers.0.mlp", "mlp_act") == 16
    assert stage0.pinned_bits("model.layers.3.mlp", "mlp_act") is None
    assert stage0.class_pinned("mlp_act") and not stage0.class_pinned("qkv_input")


def test_uniform_policy_and_defaults_meet_the_issue():
    uniform = ActivationConfig(policy="uniform", default_bits=2).class_table()
    # every class at 2 bits but attention, which never goes below 8 unless class_bits says so
    assert {c for c, b in uniform.items() if b != 2} == {"attn_core", "attn_value"}
    assert uniform["attn_core"] == uniform["attn_value"] == 8
    assert ActivationConfig(policy="uniform", default_bits=16).class_table()["attn_core"] == 16
    explicit = ActivationConfig(policy="uniform", default_bits=2, class_bits={"attn_core": 4}).class_table()
    assert explicit["attn_core"] == 4 and explicit["attn_value"] == 8
    agoq = ActivationConfig().class_table()
    # 4 bits only for the Linear inputs a LLaMA block rebuilds in backward (recipes) or stores as SDPA's
    # output (out_proj_input): what is stored is 8-bit
    assert {c for c, b in agoq.items() if b != 8} == {"qkv_input", "out_proj_input", "mlp_up_input", "down_proj_input"}
    assert {b for c, b in agoq.items() if b != 8} == {4}


def test_pipeline_holds_is_1f1b_buffer_count():
    assert [pipeline_holds(s, 4, 8) for s in range(4)] == [4, 3, 2, 2]
    assert [pipeline_holds(s, 4, 2) for s in range(4)] == [2, 2, 2, 2]
    assert pipeline_holds(0, 1, 8) == 1


def _units(layer: str = "layer") -> list[Unit]:
    # per-micro-batch sizes of one LLaMA-like block (hidden 512, MLP 1376, 512 tokens), bits 4/8
    t, h, i = 512, 512, 1376
    spec = [
        ("attn_norm_input", 2 * h, 4),
        ("qkv_input", h, 4),
        ("attn_core", 2 * h, 8),
        ("attn_value", 2 * h, 8),
        ("mlp_norm_input", 2 * h, 4),
        ("mlp_up_input", h, 4),
        ("mlp_act", 2 * i, 4),
        ("down_proj_input", i, 4),
    ]
    return [Unit(f"{layer}.{c}", c, t * n, t * n // 128, 2 * t * n, bits) for c, n, bits in spec]


SENSITIVITY = {
    c: {2: 0.3 * k, 4: 0.015 * k, 8: 5e-5 * k}
    for c, k in {
        "attn_norm_input": 1,
        "qkv_input": 1,
        "attn_core": 3,
        "attn_value": 3,
        "mlp_norm_input": 1,
        "mlp_up_input": 1,
        "mlp_act": 1,
        "down_proj_input": 2,
    }.items()
}


def _avg_bits(units: list[Unit], table: dict[str, int]) -> float:
    stored = sum(u.nbytes(table.get(u.cls, u.bits), 2) for u in units)
    return 8 * stored / sum(u.numel for u in units)


@pytest.mark.parametrize("target", [3.0, 4.0, 5.0, 6.5])
def test_budget_meets_target_deterministically(target):
    units = _units()
    table = allocate_budget(units, 0, 0, SENSITIVITY, [2, 4, 8], 2, target_avg_bits=target)
    assert _avg_bits(units, table) <= target
    assert _avg_bits(units, table) > target - 1.5  # uses the budget, not the minimum
    again = allocate_budget(list(reversed(_units())), 0, 0, SENSITIVITY, [2, 4, 8], 2, target_avg_bits=target)
    assert again == table


def test_budget_floors_and_pins():
    units = _units()
    floors = {"attn_core": 8, "attn_value": 8}
    table = allocate_budget(units, 0, 0, SENSITIVITY, [2, 4, 8], 2, target_avg_bits=4.0, floors=floors)
    assert table["attn_core"] == table["attn_value"] == 8
    assert _avg_bits(units, table) <= 4.0
    # an impossible floor is dropped rather than missing the budget
    table = allocate_budget(units, 0, 0, SENSITIVITY, [2, 4, 8], 2, target_avg_bits=2.5, floors=floors)
    assert _avg_bits(units, table) <= 2.5
    units[0].pinned, units[0].bits = True, 16
    table = allocate_budget(units, 0, 0, SENSITIVITY, [2, 4, 8], 2, target_avg_bits=4.0)
    assert "attn_norm_input" not in table and _avg_bits(units, table) <= 4.0
    assert allocate_budget(units, 0, 0, SENSITIVITY, [2, 4, 8], 2, budget_bytes=1) == {
        c: 2 for c in table
    }  # unreachable: the smallest candidates


def test_measured_sensitivity_orders_moves():
    assert error(SENSITIVITY, "mlp_act", 16) == 0.0
    assert error({}, "mlp_act", 4) == 4.0**-4  # prior where nothing was measured
    units = _units()
    table = allocate_budget(units, 0, 0, SENSITIVITY, [2, 4, 8], 2, target_avg_bits=5.0)
    # attention is 3x as sensitive per element: it keeps more bits than the big MLP tensors
    assert table["attn_core"] >= table["mlp_act"]


def test_stage_balancing_4_stages_within_tolerance():
    holds = {s: pipeline_holds(s, 4, 8) for s in range(4)}
    plans = {s: StagePlan(_units("layers.0") + _units("layers.1"), 0, holds[s], SENSITIVITY) for s in range(4)}
    changed, before, after = balance_stages(plans, tolerance=0.15, min_bits=2, scale_bytes=2)
    assert spread(before) == pytest.approx(1.0)  # stage 0 holds 4 micro-batches, stage 3 holds 2
    assert spread(after) <= 0.15
    assert not changed[2] and not changed[3]  # the lightest stages keep their bits
    assert len(changed[0]) >= len(changed[1]) > 0
    assert all(b < 8 or c.endswith("attn_core") for (m, c), b in changed[0].items())
    for s, plan in plans.items():
        assert plan.peak(2, changed[s]) == after[s]


@pytest.mark.parametrize("policy", ["uniform", "agoq"])
def test_loss_head_log_probabilities_never_below_the_floor(policy: str) -> None:
    """Under ``policy: uniform`` at 2 bits, and a rule asking 2 bits of the head's class, the
    log-probabilities the loss saves (the largest tensor of the tiny LLaMA's head: vocab 256 > hidden
    128) are still stored at ``LOSS_HEAD_MIN_BITS``; everything else of the class follows the policy."""
    from agoq_ds.activation import ActivationQuantizer
    from agoq_ds.activation.classes import LOSS_HEAD_MIN_BITS
    from agoq_ds.config import ActivationConfig
    from agoq_ds.testing.models import build_llama
    from tests.activation.act_helpers import lm_step, text_batch

    model = build_llama("tiny", seed=0)
    config = ActivationConfig(
        policy=policy, default_bits=2, min_numel=0, rules=[{"class": "embedding", "bits": 2}], recompute=False
    )
    quantizer = ActivationQuantizer(model, config).install()
    ids = text_batch()
    lm_step(model, ids)  # traced
    quantizer.on_step_end()
    lm_step(model, ids)
    head = quantizer.engine.ledger.by_class["embedding"]
    quantizer.remove()
    log_probs = ids.numel() * 256  # one per token and vocabulary entry
    at_floor = log_probs * (LOSS_HEAD_MIN_BITS + 16 / 128) / 8  # codes + bf16 scales
    assert head.quantized_numel >= log_probs
    assert head.stored >= at_floor, f"{head.stored} bytes: the log-probabilities went below {LOSS_HEAD_MIN_BITS} bits"
    assert head.stored < at_floor + (head.numel - log_probs) * 1.0  # the rest of the class at <= 8 bits
