"""How the 8-bit gradient path gets into DeepSpeed, and which configurations it supports.

``DeepSpeedEngine._configure_zero_optimizer`` constructs the module-global name
``deepspeed.runtime.engine.DeepSpeedZeroOptimizer`` with about 30 version-specific arguments.
``agoq_zero_optimizer(cfg)`` rebinds that name, for the duration of the block only, to a subclass
of ``AgoqZeroOptimizer`` that carries ``cfg``, and ``deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3``
(which the engine imports when it builds a stage-3 optimizer) to one of ``AgoqStage3Optimizer``; DeepSpeed
then builds it with its own arguments::

    with agoq_zero_optimizer(agoq_config):
        engine, *_ = deepspeed.initialize(model=model, config=ds_config, ...)

``agoq_bf16_optimizer(cfg)`` does the same for ``deepspeed.runtime.engine.BF16_Optimizer`` (bf16 with
fp32 gradient accumulation at ZeRO stage 1, bf16 pipelines at stage 0). ZeRO stage 0 without
``BF16_Optimizer`` needs no swap: the AGoQ engine hangs a ``ParamGradients`` on itself.

``check_supported(ds_config_or_engine, agoq_config)`` raises ``UnsupportedConfigError`` (a
``ValueError``) naming the setting, before DeepSpeed builds anything.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..config import AgoqConfig

_lock = threading.RLock()


class UnsupportedConfigError(ValueError):
    """A DeepSpeed setting the 8-bit gradient path does not support; the message names it."""


def _bound(module: str, name: str, agoq_config: AgoqConfig) -> type:
    from importlib import import_module

    base = getattr(import_module(module), name)
    return type(base.__name__, (base,), {"agoq_config": agoq_config, "__module__": __name__})


def optimizer_class(agoq_config: AgoqConfig) -> type:
    """A subclass of ``AgoqZeroOptimizer`` bound to ``agoq_config`` (constructible with exactly
    ``DeepSpeedZeroOptimizer``'s arguments)."""
    return _bound("agoq_ds.gradient.zero_optimizer", "AgoqZeroOptimizer", agoq_config)


def bf16_optimizer_class(agoq_config: AgoqConfig) -> type:
    """A subclass of ``AgoqBF16Optimizer`` bound to ``agoq_config`` (constructible with exactly
    ``BF16_Optimizer``'s arguments)."""
    return _bound("agoq_ds.gradient.bf16_optimizer", "AgoqBF16Optimizer", agoq_config)


def stage3_optimizer_class(agoq_config: AgoqConfig) -> type:
    """A subclass of ``AgoqStage3Optimizer`` bound to ``agoq_config`` (constructible with exactly
    ``DeepSpeedZeroOptimizer_Stage3``'s arguments)."""
    return _bound("agoq_ds.gradient.stage3_optimizer", "AgoqStage3Optimizer", agoq_config)


@contextmanager
def _rebound(module: str, name: str, cls: type) -> Iterator[type]:
    """``module.name`` is ``cls`` inside the block (under the lock), DeepSpeed's class again after it."""
    from importlib import import_module

    target = import_module(module)
    with _lock:
        saved = getattr(target, name)
        setattr(target, name, cls)
        try:
            yield cls
        finally:
            setattr(target, name, saved)


@contextmanager
def agoq_zero_optimizer(agoq_config: AgoqConfig) -> Iterator[type]:
    """Make DeepSpeed build agoq's ZeRO optimizers inside the block: ``AgoqZeroOptimizer`` for stages
    1/2 (rebinds ``deepspeed.runtime.engine.DeepSpeedZeroOptimizer``) and ``AgoqStage3Optimizer`` for
    stage 3 (rebinds ``deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3``, which the engine
    imports when it builds one). Yields the stage 1/2 class."""
    with (
        _rebound("deepspeed.runtime.engine", "DeepSpeedZeroOptimizer", optimizer_class(agoq_config)) as cls,
        _rebound("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3", stage3_optimizer_class(agoq_config)),
    ):
        yield cls


@contextmanager
def agoq_bf16_optimizer(agoq_config: AgoqConfig) -> Iterator[type]:
    """Make DeepSpeed build ``AgoqBF16Optimizer`` wherever it would build ``BF16_Optimizer`` inside the
    block (rebinds ``deepspeed.runtime.engine.BF16_Optimizer`` under the lock; yields the class)."""
    with _rebound("deepspeed.runtime.engine", "BF16_Optimizer", bf16_optimizer_class(agoq_config)) as cls:
        yield cls


def device_name(device: Any) -> str:
    """An offload device as DeepSpeed spells it in JSON (``"cpu"``, ``"nvme"``, ``"none"``), whether it
    arrives as DeepSpeed's ``OffloadDeviceEnum`` or as a plain string."""
    return str(getattr(device, "value", device) or "none").lower()


def _settings_from_dict(ds_config: dict[str, Any]) -> dict[str, Any]:
    zero = ds_config.get("zero_optimization") or {}
    stage = zero.get("stage", 0)

    def offload_device(key: str) -> str:
        block = zero.get(key)
        if not isinstance(block, dict):
            return "none"
        return device_name(block.get("device"))

    def enabled(key: str) -> bool:
        block = ds_config.get(key)
        return isinstance(block, dict) and block.get("enabled") is True

    optimizer = ds_config.get("optimizer") or {}
    return {
        "stage": int(stage) if isinstance(stage, int | str) and str(stage).isdigit() else None,
        "offload_optimizer": offload_device("offload_optimizer"),
        "offload_param": offload_device("offload_param"),
        "fp16": enabled("fp16"),
        "bf16": enabled("bf16") or enabled("bfloat16"),
        "grad_accum_dtype": str((ds_config.get("data_types") or {}).get("grad_accum_dtype") or "").lower(),
        "zenflow": zero.get("zenflow") is not None,
        "quantized_gradients": bool(zero.get("zero_quantized_gradients")),
        "optimizer_type": str(optimizer.get("type", "")).lower(),
        "deepcompile": bool((ds_config.get("compile") or {}).get("deepcompile")),
        "moe": False,
        "pipeline": False,
    }


def _settings_from_engine(engine: Any) -> dict[str, Any]:
    import torch

    _, grad_accum = engine.get_data_types()
    return {
        "stage": int(engine.zero_optimization_stage()),
        "offload_optimizer": device_name(getattr(engine.zero_offload_optimizer(), "device", None)),
        "offload_param": device_name(getattr(engine.zero_offload_param(), "device", None)),
        "fp16": engine.fp16_enabled(),
        "bf16": engine.bfloat16_enabled(),
        "grad_accum_dtype": "fp32" if grad_accum == torch.float32 else str(grad_accum),
        "zenflow": bool(getattr(engine, "zenflow", False)),
        "quantized_gradients": bool(getattr(engine, "zero_quantized_gradients", lambda: False)()),
        "optimizer_type": type(getattr(engine, "basic_optimizer", None)).__name__.lower(),
        "deepcompile": bool(getattr(engine, "is_deepcompile_enabled", lambda: False)()),
        "moe": bool(getattr(engine, "has_moe_layers", False)),
        "pipeline": bool(getattr(engine, "pipeline_parallelism", False)),
    }


def check_supported(ds_config_or_engine: Any, agoq_config: AgoqConfig) -> None:
    """Raise ``UnsupportedConfigError`` when the 8-bit gradient path cannot run with this config.

    ``ds_config_or_engine`` is the DeepSpeed config dict or a built ``DeepSpeedEngine``. Nothing is
    checked when ``agoq.enabled`` or ``agoq.gradient.enabled`` is false. Supported: ZeRO stage 0
    (plain data parallel, incl. ``BF16_Optimizer`` in bf16 pipelines), 1, 2 and 3, fp32 and bf16, with or
    without fp32 gradient accumulation. Rejected: ZeRO++ qgZ at stage 3, optimizer/parameter offload, MoE
    (engine only), fp16 on CPU and fp16 at stage 0 (untested), ZenFlow, Muon, DeepCompile.
    """
    if not (agoq_config.enabled and agoq_config.gradient.enabled):
        return
    if isinstance(ds_config_or_engine, dict):
        s = _settings_from_dict(ds_config_or_engine)
    else:
        s = _settings_from_engine(ds_config_or_engine)
    off = "set agoq.gradient.enabled=false to train without 8-bit gradients"
    stage = s["stage"]
    if stage == 3 and s["quantized_gradients"]:
        raise UnsupportedConfigError(
            "agoq.gradient: zero_optimization.zero_quantized_gradients=true (ZeRO++ qgZ) and agoq's 8-bit gradients "
            f"both replace the ZeRO-3 reduce-scatter; use one of them: remove zero_quantized_gradients or {off}"
        )
    for key in ("offload_optimizer", "offload_param"):
        if s[key] not in ("none", ""):
            raise UnsupportedConfigError(
                f"agoq.gradient: zero_optimization.{key}.device={s[key]!r} is not supported by the 8-bit gradient "
                f"path; remove the offload or {off}"
            )
    if s["moe"]:
        raise UnsupportedConfigError(f"agoq.gradient: MoE layers (expert-parallel gradients) are not supported; {off}")
    if s["fp16"]:
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() == "cpu":
            raise UnsupportedConfigError(
                f"agoq.gradient: fp16.enabled=true is not supported on CPU (use bf16 or fp32), or {off}"
            )
        if stage == 0:
            raise UnsupportedConfigError(
                "agoq.gradient: fp16.enabled=true at zero_optimization.stage=0 is not supported (DeepSpeed's fp16 "
                f"optimizers with 8-bit gradients are untested); use bf16, ZeRO stage 1 or 2, or {off}"
            )
    if s["zenflow"]:
        raise UnsupportedConfigError(f"agoq.gradient: zero_optimization.zenflow is not supported; {off}")
    if "muon" in s["optimizer_type"]:
        raise UnsupportedConfigError(f"agoq.gradient: the Muon optimizer is not supported; {off}")
    if s["deepcompile"]:
        raise UnsupportedConfigError(f"agoq.gradient: compile.deepcompile=true is not supported; {off}")
