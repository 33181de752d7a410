"""Swap-in of the 8-bit ZeRO optimizer and rejection of unsupported configs (single process)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from agoq_ds.config import AgoqConfig, parse_agoq_config
from agoq_ds.deepspeed.install import agoq_zero_optimizer, optimizer_class
from agoq_ds.deepspeed.unsupported import UnsupportedConfigError, check_supported


def _cfg(stage: int = 2, **extra) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "bf16": {"enabled": True}}
    cfg.update(extra)
    return cfg


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_supported_stages_pass(stage: int) -> None:
    check_supported(_cfg(stage), AgoqConfig())
    check_supported(_cfg(stage, bf16={"enabled": False}), AgoqConfig())


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_fp32_accum_is_supported(stage: int) -> None:
    # stage 1 builds BF16_Optimizer, which agoq swaps for AgoqBF16Optimizer
    check_supported(_cfg(stage, data_types={"grad_accum_dtype": "fp32"}), AgoqConfig())


@pytest.mark.parametrize(
    ("config", "names"),
    [
        (_cfg(3, zero_optimization={"stage": 3, "zero_quantized_gradients": True}), "zero_quantized_gradients"),
        (_cfg(3, zero_optimization={"stage": 3, "offload_optimizer": {"device": "nvme"}}), "offload_optimizer.device"),
        (_cfg(0, zero_optimization={"stage": 0, "offload_optimizer": {"device": "cpu"}}), "offload_optimizer.device"),
        (_cfg(0, zero_optimization={"stage": 0, "cpu_offload": True}), "offload_optimizer.device"),  # legacy key
        (_cfg(2, bf16={"enabled": False}, fp16={"enabled": True}), "fp16.enabled"),
        (_cfg(2, optimizer={"type": "Muon", "params": {}}), "Muon"),
        (_cfg(2, compile={"deepcompile": True}), "compile.deepcompile"),
        (_cfg(2, zero_optimization={"stage": 2, "zenflow": {"topk_ratio": 0.1}}), "zenflow"),
    ],
)
def test_unsupported_configs_name_the_setting(config: dict, names: str) -> None:
    with pytest.raises(UnsupportedConfigError, match=names.replace(".", r"\.")) as info:
        check_supported(config, AgoqConfig())
    assert isinstance(info.value, ValueError)
    assert "agoq.gradient.enabled=false" in str(info.value)
    # These leave agoq's activations working: the default block falls back to stock gradients.
    assert info.value.stock_gradients_suffice == any(k in names for k in ("offload", "Muon", "zenflow"))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_muon_is_refused_above_stage0_only(stage: int) -> None:
    muon = {"type": "Muon", "params": {}}
    check_supported(_cfg(0, optimizer=muon), AgoqConfig())  # the 8-bit all-reduce leaves whole matrices
    with pytest.raises(UnsupportedConfigError, match="Muon"):
        check_supported(_cfg(stage, optimizer=muon), AgoqConfig())


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_parameter_offload_below_stage3_is_ignored_as_deepspeed_ignores_it(stage: int) -> None:
    check_supported(_cfg(stage, zero_optimization={"stage": stage, "offload_param": {"device": "cpu"}}), AgoqConfig())


@pytest.mark.parametrize(
    "zero",
    [
        {"stage": 1, "offload_optimizer": {"device": "cpu"}},
        {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
        {"stage": 2, "offload_optimizer": {"device": "nvme"}},  # DeepSpeed runs it as cpu below ZeRO-3
        {"stage": 2, "cpu_offload": True},  # legacy key
        {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "nvme"}},
        {"stage": 3, "cpu_offload": True, "cpu_offload_params": True},  # legacy keys
    ],
)
def test_offload_runs_with_8bit_gradients(zero: dict) -> None:
    check_supported(_cfg(zero["stage"], zero_optimization=zero), parse_agoq_config({"gradient": {"enabled": True}}))


def test_nothing_checked_when_gradient_path_is_off() -> None:
    check_supported(_cfg(3), parse_agoq_config({"gradient": {"enabled": False}}))
    check_supported(_cfg(3), parse_agoq_config({"enabled": False}))


def test_context_manager_rebinds_only_inside_the_block() -> None:
    import deepspeed.runtime.engine as ds_engine
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from agoq_ds.deepspeed.zero_optimizer import AgoqZeroOptimizer

    cfg = parse_agoq_config({"gradient": {"group_size": 256}})
    with agoq_zero_optimizer(cfg) as cls:
        assert ds_engine.DeepSpeedZeroOptimizer is cls
        assert issubclass(cls, AgoqZeroOptimizer) and issubclass(cls, DeepSpeedZeroOptimizer)
        assert cls.agoq_config.gradient.group_size == 256
    assert ds_engine.DeepSpeedZeroOptimizer is DeepSpeedZeroOptimizer
    with pytest.raises(RuntimeError), agoq_zero_optimizer(cfg):
        raise RuntimeError("initialize failed")
    assert ds_engine.DeepSpeedZeroOptimizer is DeepSpeedZeroOptimizer
    assert optimizer_class(cfg).__name__ == "AgoqZeroOptimizer"


def test_stage3_class_is_rebound_only_inside_the_block() -> None:
    import deepspeed.runtime.zero.stage3 as ds_stage3
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    from agoq_ds.deepspeed.stage3_optimizer import AgoqStage3Optimizer

    cfg = parse_agoq_config({"gradient": {"group_size": 256}})
    with agoq_zero_optimizer(cfg):
        cls = ds_stage3.DeepSpeedZeroOptimizer_Stage3
        assert issubclass(cls, AgoqStage3Optimizer) and cls.agoq_config.gradient.group_size == 256
    assert ds_stage3.DeepSpeedZeroOptimizer_Stage3 is DeepSpeedZeroOptimizer_Stage3
    with pytest.raises(RuntimeError), agoq_zero_optimizer(cfg):
        raise RuntimeError("initialize failed")
    assert ds_stage3.DeepSpeedZeroOptimizer_Stage3 is DeepSpeedZeroOptimizer_Stage3


@pytest.mark.parametrize(
    ("arguments", "names"),
    [
        (
            {
                "offload_param_config": SimpleNamespace(device="cpu"),
                "offload_optimizer_config": SimpleNamespace(device="nvme"),
            },
            "offload_optimizer.device='nvme'",
        ),
        ({"all2all_process_group": object()}, "zero_quantized_gradients"),
        ({"zenflow_config": object()}, "zenflow"),
    ],
)
def test_stage3_optimizer_refuses_by_name(arguments: dict, names: str) -> None:
    """What DeepSpeed hands the stage-3 optimizer, refused before anything is built."""
    from agoq_ds.deepspeed.unsupported import reject_unsupported_arguments

    with pytest.raises(ValueError, match=names.replace(".", r"\.")):
        reject_unsupported_arguments(arguments)
    reject_unsupported_arguments({"offload_param_config": SimpleNamespace(device="none")})
    reject_unsupported_arguments(
        {
            "offload_param_config": SimpleNamespace(device="nvme"),
            "offload_optimizer_config": SimpleNamespace(device="cpu"),
        }
    )


def test_bf16_context_manager_rebinds_only_inside_the_block() -> None:
    import deepspeed.runtime.engine as ds_engine
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    from agoq_ds.deepspeed.bf16_optimizer import AgoqBF16Optimizer
    from agoq_ds.deepspeed.install import agoq_bf16_optimizer, bf16_optimizer_class

    cfg = parse_agoq_config({"gradient": {"group_size": 64}})
    with agoq_bf16_optimizer(cfg) as cls:
        assert ds_engine.BF16_Optimizer is cls
        assert issubclass(cls, AgoqBF16Optimizer) and issubclass(cls, BF16_Optimizer)
        assert cls.agoq_config.gradient.group_size == 64
    assert ds_engine.BF16_Optimizer is BF16_Optimizer
    with pytest.raises(RuntimeError), agoq_bf16_optimizer(cfg):
        raise RuntimeError("initialize failed")
    assert ds_engine.BF16_Optimizer is BF16_Optimizer
    assert bf16_optimizer_class(cfg).__name__ == "AgoqBF16Optimizer"


def test_fp16_at_stage0_is_rejected() -> None:
    with pytest.raises(UnsupportedConfigError, match=r"fp16\.enabled"):
        check_supported(_cfg(0, bf16={"enabled": False}, fp16={"enabled": True}), AgoqConfig())


def test_offload_device_read_whether_enum_or_string() -> None:
    """DeepSpeed hands the offload device as its enum or, from some paths, as a plain string; either is
    read with the device's JSON spelling (no AttributeError, no 'offloaddeviceenum.nvme'): NVMe optimizer
    offload at ZeRO-3 is refused by name, cpu is accepted."""
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    from agoq_ds.deepspeed.unsupported import reject_unsupported_arguments

    stage3 = {"offload_param_config": None}
    for given in ("nvme", OffloadDeviceEnum("nvme")):
        offload = SimpleNamespace(device=given)
        with pytest.raises(ValueError, match=r"offload_optimizer\.device='nvme' is not supported"):
            reject_unsupported_arguments({**stage3, "offload_optimizer_config": offload})
    for given in ("cpu", OffloadDeviceEnum("cpu"), "none"):
        reject_unsupported_arguments({**stage3, "offload_optimizer_config": SimpleNamespace(device=given)})
    reject_unsupported_arguments({"offload_optimizer_config": None})
