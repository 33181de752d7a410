"""What the 8-bit gradient path does not support, refused by name before anything is built.

One list of refusals serves every place a configuration can be seen: the ``ds_config`` dict
(``check_supported``, called by the AGoQ engine before DeepSpeed builds its optimizer), a built
engine (``check_supported``), and the arguments DeepSpeed hands an optimizer subclass
(``reject_unsupported_arguments``). Each refusal is an ``UnsupportedConfigError`` (a ``ValueError``)
naming the setting and its value, what to do instead, and how to train without 8-bit gradients.
"""

from __future__ import annotations

from typing import Any

from ..config import AgoqConfig

OFF = "set agoq.gradient.enabled=false to train without 8-bit gradients"
"""How every refusal ends."""


class UnsupportedConfigError(ValueError):
    """A DeepSpeed setting the 8-bit gradient path does not support; the message names it."""

    setting: str = ""
    """The refused setting and its value, as the message names it."""
    stock_gradients_suffice: bool = False
    """The rest of agoq runs with this setting when gradients take DeepSpeed's own path: with
    ``agoq.gradient.enabled`` left at its default the engine does that (and says so) instead of
    refusing; an explicit ``enabled: true`` is still refused."""


def _refusal(
    setting: str, detail: str = "", remedy: str = "", stock_gradients_suffice: bool = False
) -> UnsupportedConfigError:
    error = UnsupportedConfigError(f"agoq.gradient: {setting} is not supported{detail}; {remedy}{OFF}")
    error.setting = setting
    error.stock_gradients_suffice = stock_gradients_suffice
    return error


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
            # DeepSpeed's legacy spellings: "cpu_offload" / "cpu_offload_params": true mean device "cpu".
            legacy = {"offload_optimizer": "cpu_offload", "offload_param": "cpu_offload_params"}[key]
            return "cpu" if zero.get(legacy) is True else "none"
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


def _settings_from_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """The settings visible in the arguments DeepSpeed passes an optimizer's ``__init__``."""

    def offload(key: str) -> str:
        return device_name(getattr(arguments.get(key), "device", None))

    reduce_scatter = bool(arguments.get("reduce_scatter", True))
    if "partition_grads" in arguments:  # DeepSpeedZeroOptimizer: ZeRO-1 or ZeRO-2
        stage = 2 if arguments["partition_grads"] else 1
    elif "offload_param_config" in arguments:  # DeepSpeedZeroOptimizer_Stage3
        stage = 3
    else:
        stage = None
    return {
        "stage": stage,
        "offload_optimizer": offload("offload_optimizer_config"),
        "offload_param": offload("offload_param_config"),
        "fp16": False,
        "zenflow": arguments.get("zenflow_config") is not None,
        "quantized_gradients": arguments.get("all2all_process_group") is not None,
        "optimizer_type": type(arguments.get("init_optimizer")).__name__.lower(),
        "deepcompile": False,
        "moe": bool(arguments.get("has_moe_layers")),
        "reduce_scatter": reduce_scatter,
    }


def _refuse(s: dict[str, Any]) -> None:
    stage = s["stage"]
    if s["quantized_gradients"] and stage in (3, None):
        raise _refusal(
            "zero_optimization.zero_quantized_gradients=true (ZeRO++ qgZ)",
            " together with agoq's 8-bit gradients (both replace the ZeRO-3 reduce-scatter)",
            "use one of them: remove zero_quantized_gradients or ",
        )
    # Optimizer offload at ZeRO-1/2/3 crosses to the host in 8 bits (at ZeRO-1/2 DeepSpeed runs "nvme" as
    # "cpu"); parameter offload (ZeRO-3 only; at stages 0-2 DeepSpeed ignores the block) does not touch
    # the gradient path. Refused: optimizer offload at stage 0, and ZeRO-Infinity's NVMe optimizer swap,
    # which hands gradients to DeepSpeed's swapper (async_io) and is unmeasured: the op does not build
    # without libaio, as on the machines agoq is tested on.
    device = s["offload_optimizer"]
    if device not in ("none", "") and (stage == 0 or (stage in (3, None) and device == "nvme")):
        raise _refusal(
            f"zero_optimization.offload_optimizer.device={device!r}",
            " by the 8-bit gradient path"
            + (" at zero_optimization.stage=0" if stage == 0 else " at ZeRO-3 (unmeasured)"),
            "use offload_optimizer.device='cpu', remove the offload, or ",
            stock_gradients_suffice=True,
        )
    if s["moe"]:
        check_moe(stage, bool(s.get("reduce_scatter", True)))
    if s["fp16"]:
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() == "cpu":
            raise _refusal("fp16.enabled=true", " on CPU", "use bf16 or fp32, or ")
        if stage == 0:
            raise _refusal(
                "fp16.enabled=true at zero_optimization.stage=0",
                " (DeepSpeed's fp16 optimizers with 8-bit gradients are untested)",
                "use bf16, ZeRO stage 1, 2 or 3, or ",
            )
    if s["zenflow"]:
        raise _refusal(
            "zero_optimization.zenflow",
            " by the 8-bit gradient path (ZenFlow's optimizer selects gradient columns from DeepSpeed's own"
            " full-width gradient buffers every step, which the 8-bit path does not fill)",
            stock_gradients_suffice=True,
        )
    check_optimizer_type(stage, s["optimizer_type"])
    if s["deepcompile"]:
        raise _refusal(
            "compile.deepcompile=true",
            " (DeepCompile's compiled passes replace ZeRO's gradient hooks, so agoq's reduction would never"
            " run; unmeasured: DeepSpeed's DeepCompile op is not implemented on the CPU accelerator)",
        )


MUON_REASON = (
    " by the 8-bit gradient path above ZeRO stage 0 (Muon orthogonalises each weight matrix as a whole:"
    " DeepSpeed's ZeRO optimizers all-reduce every Muon matrix that spans partitions and build the update"
    " from the full matrices, where the 8-bit reduce-scatter gives each rank its slice only)"
)
"""Why Muon's gradients take DeepSpeed's own path."""


def check_optimizer_type(stage: int | None, name: str) -> None:
    """Raise ``UnsupportedConfigError`` for DeepSpeed's Muon (``name``: the optimizer's type or class
    name) above stage 0. At stage 0 the 8-bit all-reduce leaves whole matrices in ``param.grad`` and
    Muon orthogonalises them in its own step, as without agoq (``stage`` None: ``BF16_Optimizer``,
    whose flat partitions Muon cannot orthogonalise)."""
    if "muon" in name.lower() and stage != 0:
        raise _refusal("the Muon optimizer", MUON_REASON, stock_gradients_suffice=True)


def check_moe(stage: int | None, reduce_scatter: bool) -> None:
    """Raise ``UnsupportedConfigError`` for MoE layers where the 8-bit path cannot reduce them: ZeRO-1/2
    reduce-scatter each expert gradient over its expert-data-parallel group; elsewhere (stage 0's
    ``ParamGradients``, ZeRO-3, ``BF16_Optimizer``, ZeRO-1/2's all-reduce path) the 8-bit path reduces
    over one group, which would average expert gradients over ranks that hold other experts."""
    if stage in (1, 2) and reduce_scatter:
        return
    where = "with zero_optimization.reduce_scatter=false" if stage in (1, 2) else "outside ZeRO stage 1 and 2"
    raise _refusal(
        "MoE layers (expert-parallel gradient groups)",
        f" by the 8-bit gradient path {where}",
        "use ZeRO stage 1 or 2 with reduce_scatter, or ",
        stock_gradients_suffice=True,
    )


def check_supported(ds_config_or_engine: Any, agoq_config: AgoqConfig) -> None:
    """Raise ``UnsupportedConfigError`` when the 8-bit gradient path cannot run with this config.

    ``ds_config_or_engine`` is the DeepSpeed config dict or a built ``DeepSpeedEngine``. Nothing is
    checked when ``agoq.enabled`` or ``agoq.gradient.enabled`` is false. Supported: ZeRO stage 0
    (plain data parallel, incl. ``BF16_Optimizer`` in bf16 pipelines), 1, 2 and 3, fp32 and bf16, with or
    without fp32 gradient accumulation, with optimizer offload at ZeRO-1/2/3 (cpu) and parameter offload.
    Refused: ZeRO++ qgZ, optimizer offload at ZeRO-0 and to NVMe at ZeRO-3, MoE outside ZeRO-1/2's
    reduce-scatter (seen in the optimizer's arguments and by the engine), fp16 on CPU and fp16 at stage
    0 (untested), ZenFlow, Muon above stage 0, DeepCompile. All but qgZ, fp16 and DeepCompile leave the rest of agoq
    working (``stock_gradients_suffice``): the default block then runs gradients on DeepSpeed's path.
    """
    if not agoq_config.gradient_on:
        return
    if isinstance(ds_config_or_engine, dict):
        _refuse(_settings_from_dict(ds_config_or_engine))
    else:
        _refuse(_settings_from_engine(ds_config_or_engine))


def reject_unsupported_arguments(arguments: dict[str, Any]) -> None:
    """Raise ``UnsupportedConfigError`` for optimizer arguments (as DeepSpeed passes them to
    ``DeepSpeedZeroOptimizer``, ``DeepSpeedZeroOptimizer_Stage3`` or ``BF16_Optimizer``) the 8-bit
    path cannot honour."""
    _refuse(_settings_from_arguments(arguments))
