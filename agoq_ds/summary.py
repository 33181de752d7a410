"""The start-up summary the AGoQ engine prints once on rank 0."""

from __future__ import annotations

from typing import Any

from . import quant


def _activation_line(engine: Any) -> list[str]:
    cfg = engine.agoq_config.activation
    quantizer = engine.agoq_activation
    if quantizer is None:
        return ["activations   off (stored as DeepSpeed/torch would)"]
    table = quantizer.table()
    by_bits: dict[int, list[str]] = {}
    for cls, bits in table.items():
        by_bits.setdefault(bits, []).append(cls)
    groups = "; ".join(f"{bits}-bit: {', '.join(sorted(names))}" for bits, names in sorted(by_bits.items()))
    stage = f"stage {getattr(engine, 'stage_id', 0)}/{getattr(engine, 'num_stages', 1)}"
    return [
        f"activations   policy {cfg.policy}: {groups}",
        f"              group {cfg.group_size}, {cfg.scale_dtype} scales, {cfg.rounding} rounding, "
        f"min {cfg.min_numel} elements, checkpointed inputs {'quantized' if cfg.checkpointing else 'kept'}",
        f"              pipeline {stage}, stage policy {cfg.pipeline.mode}"
        + (f", budget {cfg.budget.target_avg_bits} bits" if cfg.budget.target_avg_bits else ""),
    ]


def _gradient_line(engine: Any) -> list[str]:
    cfg = engine.agoq_config.gradient
    path = engine.agoq_gradient_path() if hasattr(engine, "agoq_gradient_path") else None
    if path is None:
        return ["gradients     stock DeepSpeed (agoq gradient path off)"]
    store = f"int{cfg.storage_bits} storage" if cfg.storage_bits == 8 else "fp32 storage"
    ef = " + error feedback" if cfg.error_feedback else ""
    counts = path.agoq_path_counts()
    check = f", checked at the first {cfg.check_steps} steps" if cfg.check_steps else ""
    return [
        f"gradients     {path.agoq_description}, {store}{ef}, group {cfg.group_size}, {cfg.rounding} rounding "
        f"[{type(path).__name__}]",
        f"              parameters: {counts['params_8bit']:.0f} on the 8-bit path, {counts['params_exact']:.0f} exact "
        f"(below min_numel {cfg.min_numel} or one rank){check}",
    ]


def startup_summary(engine: Any) -> str:
    """One block of text: what agoq quantizes at how many bits, the gradient path, the kernels."""
    import torch

    device = torch.device(engine.device) if hasattr(engine, "device") else torch.device("cpu")
    kernels = getattr(engine, "agoq_kernels", None)
    backend = kernels.select(device) if kernels is not None else quant.select(device)
    detail = next((s.detail for s in quant.all_status() if s.name == backend), "")
    zero = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
    dtype = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    lines = [
        f"engine        {type(engine).__name__}: ZeRO stage {zero}, {dtype}, "
        f"{engine.dp_world_size} data-parallel rank(s)",
        f"kernels       {device.type} tensors -> {backend} ({detail})",
        *_activation_line(engine),
        *_gradient_line(engine),
    ]
    bar = "=" * 30
    return "\n".join([f"{bar} agoq-ds active {bar}", *lines, "=" * (len(bar) * 2 + 16)])
