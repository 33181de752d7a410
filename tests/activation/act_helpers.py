"""Shared pieces of the activation tests: small real-text batches, gradients with and without the
quantizer, error measures."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from agoq_ds.activation import ActivationQuantizer
from agoq_ds.config import ActivationConfig
from agoq_ds.quant import dequantize, quantize

warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*")


def text_batch(batch: int = 2, seq: int = 64, offset: int = 0) -> torch.Tensor:
    """``[batch, seq]`` byte tokens of real text (the embedded stdlib corpus)."""
    from agoq_ds.testing.data import load_bytes

    tokens = load_bytes(max_bytes=offset + batch * seq * 4).long()
    return torch.stack([tokens[offset + i * seq * 3 : offset + i * seq * 3 + seq] for i in range(batch)])


def lm_step(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward/backward of an HF causal LM; returns fp32 copies of the gradients."""
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def quantized_grads(
    model: nn.Module, ids: torch.Tensor, config: ActivationConfig, prepare: Callable | None = None
) -> tuple[dict[str, torch.Tensor], ActivationQuantizer]:
    """Gradients of the second quantized step (the first one is traced), and the quantizer
    (removed again, its stats still readable)."""
    quantizer = ActivationQuantizer(model, config).install()
    if prepare is not None:
        prepare(quantizer)
    lm_step(model, ids)
    quantizer.on_step_end()
    grads = lm_step(model, ids)
    quantizer.on_step_end()
    quantizer.remove()
    return grads, quantizer


def rel_errors(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-parameter ``|g - g_ref| / |g_ref|``."""
    return {n: float((got[n] - r).norm() / r.norm()) for n, r in ref.items() if r.norm() > 0}


def cosines(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-parameter cosine similarity."""
    return {
        n: float(torch.nn.functional.cosine_similarity(r.flatten(), got[n].flatten(), dim=0))
        for n, r in ref.items()
        if r.norm() > 0
    }


def saved_activation_error(model: nn.Module, ids: torch.Tensor, bits: int, group_size: int, min_numel: int) -> float:
    """Relative RMS quantization error ``sqrt(sum |x - Q(x)|^2 / sum |x|^2)`` of the floating
    tensors one forward saves (parameters and small tensors excluded) at ``bits``: the scale the
    gradient-error bounds are derived from."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    err, ref = [0.0], [0.0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if (
            t.is_floating_point()
            and t.numel() >= min_numel
            and t.untyped_storage().data_ptr() not in params
            and t.shape[-1] != 1
        ):
            x = t.detach().float().contiguous()
            q = dequantize(quantize(x, bits, group_size, scale_dtype=torch.bfloat16))
            err[0] += float((q - x).square().sum())
            ref[0] += float(x.square().sum())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return math.sqrt(err[0] / ref[0])
