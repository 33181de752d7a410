"""How the 8-bit gradient path gets into DeepSpeed, and which configurations it supports.

``DeepSpeedEngine._configure_zero_optimizer`` constructs the module-global name
``deepspeed.runtime.engine.DeepSpeedZeroOptimizer`` with about 30 version-specific arguments.
``agoq_zero_optimizer(cfg)`` rebinds that name, for the duration of the block only, to a subclass
of ``AgoqZeroOptimizer`` that carries ``cfg``; DeepSpeed then builds it with its own arguments::

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


def optimizer_class(agoq_config: AgoqConfig) -> type:
    """A subclass of ``AgoqZeroOptimizer`` bound to ``agoq_config`` (constructible with exactly
    ``DeepSpeedZeroOptimizer``'s arguments)."""
    from .zero_optimizer import AgoqZeroOptimizer

    return type("AgoqZeroOptimizer", (AgoqZeroOptimizer,), {"agoq_config": agoq_config, "__module__": __name__})


@contextmanager
def agoq_zero_optimizer(agoq_config: AgoqConfig) -> Iterator[type]:
    """Make DeepSpeed build ``AgoqZeroOptimizer`` for ZeRO stage 1/2 inside the block.

    Rebinds ``deepspeed.runtime.engine.DeepSpeedZeroOptimizer`` (under a lock) and restores it on
    exit; yields the class in use. Only stage 1/2 construction reads that name.
    """
    import deepspeed.runtime.engine as ds_engine

    cls = optimizer_class(agoq_config)
    with _lock:
        saved = ds_engine.DeepSpeedZeroOptimizer
        ds_engine.DeepSpeedZeroOptimizer = cls
        try:
            yield cls
        finally:
            ds_engine.DeepSpeedZeroOptimizer = saved


def bf16_optimizer_class(agoq_config: AgoqConfig) -> type:
    """A subclass of ``AgoqBF16Optimizer`` bound to ``agoq_config`` (constructible with exactly
    ``BF16_Optimizer``'s arguments)."""
    from .bf16_optimizer import AgoqBF16Optimizer

    return type("AgoqBF16Optimizer", (AgoqBF16Optimizer,), {"agoq_config": agoq_config, "__module__": __name__})


@contextmanager
def agoq_bf16_optimizer(agoq_config: AgoqConfig) -> Iterator[type]:
    """Make DeepSpeed build ``AgoqBF16Optimizer`` wherever it would build ``BF16_Optimizer`` inside the
    block (rebinds ``deepspeed.runtime.engine.BF16_Optimizer`` under the lock; yields the class)."""
    import deepspeed.runtime.engine as ds_engine

    cls = bf16_optimizer_class(agoq_config)
    with _lock:
        saved = ds_engine.BF16_Optimizer
        ds_engine.BF16_Optimizer = cls
        try:
            yield cls
        finally:
            ds_engine.BF16_Optimizer = saved


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
        "optimizer_type": type(getattr(engine, "basic_optimizer", None)).__name__.lower(),
        "deepcompile": bool(getattr(engine, "is_deepcompile_enabled", lambda: False)()),
        "moe": bool(getattr(engine, "has_moe_layers", False)),
        "pipeline": bool(getattr(engine, "pipeline_parallelism", False)),
    }


def check_supported(ds_config_or_engine: Any, agoq_config: AgoqConfig) -> None:
    """Raise ``UnsupportedConfigError`` when the 8-bit gradient path cannot run with this config.

    ``ds_config_or_engine`` is the DeepSpeed config dict or a built ``DeepSpeedEngine``. Nothing is
    checked when ``agoq.enabled`` or ``agoq.gradient.enabled`` is false. Supported: ZeRO stage 0
    (plain data parallel, incl. ``BF16_Optimizer`` in bf16 pipelines), 1 and 2, fp32 and bf16, with or
    without fp32 gradient accumulation. Rejected: ZeRO stage 3, optimizer/parameter offload, MoE
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
    if stage == 3:
        raise UnsupportedConfigError(
            "agoq.gradient: zero_optimization.stage=3 is not supported (8-bit gradients work with ZeRO stage 0, 1 "
            f"and 2); use stage 0, 1 or 2, or {off}"
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
