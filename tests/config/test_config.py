"""The "agoq" config block: defaults, round-trips, clear errors, JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agoq_ds.activation.classes import LayerClass
from agoq_ds.config import AgoqConfig, AgoqConfigError, json_schema, parse_agoq_config

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_agoq_table() -> None:
    cfg = parse_agoq_config({})
    table = cfg.activation.class_table()
    assert set(table) == {c.value for c in LayerClass}
    assert table["attn_core"] == 8 and table["mlp_act"] == 8 and table["qkv_input"] == 4
    assert cfg.gradient.communication_bits == 8 and cfg.gradient.storage_bits == 8


@pytest.mark.parametrize("block", [None, True])
def test_shorthand_blocks_mean_defaults(block) -> None:
    assert parse_agoq_config(block) == AgoqConfig()


def test_false_switches_off() -> None:
    assert parse_agoq_config(False).enabled is False


def test_uniform_policy_and_overrides() -> None:
    cfg = parse_agoq_config({"activation": {"policy": "uniform", "default_bits": 2, "class_bits": {"mlp_act": 8}}})
    table = cfg.activation.class_table()
    assert table.pop("mlp_act") == 8
    assert table.pop("attn_core") == table.pop("attn_value") == 8  # attention's floor under uniform
    assert set(table.values()) == {2}


def test_auto_means_default() -> None:
    # HF/accelerate style "auto" values fall back to the default, as in DeepSpeed's own configs.
    cfg = parse_agoq_config({"activation": {"group_size": "auto"}, "gradient": {"group_size": "auto"}})
    assert cfg.activation.group_size == 128 and cfg.gradient.group_size == 128


def test_round_trip_through_json() -> None:
    block = {
        "kernel_backend": "torch",
        "activation": {
            "rules": [{"class": "attn_core", "module": "model.layers.0.*", "bits": 16}],
            "exclude": ["lm_head"],
        },
        "gradient": {"rounding": "stochastic", "error_feedback": False},
    }
    cfg = parse_agoq_config(block)
    again = parse_agoq_config(json.loads(json.dumps(cfg.model_dump(by_alias=True))))
    assert again == cfg
    assert again.activation.rules[0].layer_class == "attn_core"


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ({"activation": {"default_bits": 3}}, "agoq.activation.default_bits=3: must be one of 2, 4, 8 or 16"),
        ({"activation": {"defalt_bits": 4}}, "agoq.activation.defalt_bits: unknown key; did you mean 'default_bits'?"),
        ({"gradient": {"group_size": 100}}, "agoq.gradient.group_size=100: must be one of 32, 64, 128"),
        ({"gradient": {"rounding": "up"}}, 'agoq.gradient.rounding="up": must be one of nearest or stochastic'),
        ({"gradient": {"comunication_bits": 8}}, "did you mean 'communication_bits'?"),
        ({"kernel_backend": "gpu"}, 'agoq.kernel_backend="gpu": must be one of auto, cuda, triton, cpp or torch'),
        (
            {"activation": {"rules": [{"class": "attn", "bits": 8}]}},
            'agoq.activation.rules[0].class="attn": must be one of',
        ),
        ({"activation": {"rules": [{"bits": 8}]}}, "agoq.activation.rules[0]"),
        ({"activation": {"class_bits": {"mlp": 4}}}, 'agoq.activation.class_bits.mlp="mlp": must be one of'),
        ({"activation": {"pipeline": {"mode": "balanced"}}}, "agoq.activation.pipeline.mode"),
        ({"activation": {"budget": {"target_avg_bits": 1}}}, "agoq.activation.budget.target_avg_bits=1"),
        ({"gradient": {"storage_bits": 4}}, "agoq.gradient.storage_bits=4: must be one of 8 or 32"),
        ({"enabeld": True}, "agoq.enabeld: unknown key; did you mean 'enabled'?"),
        ("yes", "agoq='yes': must be an object"),
    ],
)
def test_invalid_blocks_name_key_and_allowed_values(block, expected: str) -> None:
    with pytest.raises(AgoqConfigError) as err:
        parse_agoq_config(block)
    assert expected in str(err.value)


def test_all_errors_reported_at_once() -> None:
    with pytest.raises(AgoqConfigError) as err:
        parse_agoq_config({"activation": {"default_bits": 5}, "gradient": {"group_size": 7}})
    assert "default_bits=5" in str(err.value) and "group_size=7" in str(err.value)


def test_every_field_has_a_docstring() -> None:
    from agoq_ds import config as module

    models = [m for m in vars(module).values() if isinstance(m, type) and issubclass(m, module._Model)]
    assert len(models) >= 6
    for model in models:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"


def test_schema_file_is_current() -> None:
    committed = json.loads((ROOT / "docs" / "agoq_config.schema.json").read_text())
    assert committed == json.loads(json.dumps(json_schema())), "run: agoq-ds schema --out docs/agoq_config.schema.json"
