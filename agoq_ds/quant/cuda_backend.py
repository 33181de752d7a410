"""CUDA kernels (``csrc/cuda``) as a quantization backend.

Same ``quantize``/``dequantize`` as ``reference.py``, bit-exact with it for round-to-nearest.
Stochastic rounding draws its noise from a SplitMix64 hash of ``(seed, element index)``:
deterministic for a seed, unbiased, but not the reference's ``torch.rand`` stream.

The compiled module is obtained once per process (thread-safe) by ``native.NativeLoader`` with
``builder.CUDAQuantBuilder``: the install-time build if present, else a JIT build. On a CPU-only
torch or without a GPU the backend reports itself unavailable (and never tries to compile).
Environment variables (read at first use): ``AGOQ_DISABLE_CUDA=1``, ``AGOQ_CUDA_PREBUILT=0``, ``AGOQ_CUDA_JIT=0`` (see
``builder.py``).
"""

from __future__ import annotations

import torch

from .native import NativeLoader


def _builder():
    from .builder import CUDAQuantBuilder

    return CUDAQuantBuilder()


_SEED_MASK = (1 << 63) - 1
_loader = NativeLoader("CUDA", _builder)
_kernels = _loader.kernels
unavailable_reason = _loader.unavailable_reason
describe = _loader.describe


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    stochastic: bool,
    seed: int,
    scale_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize the CUDA tensor ``x``; returns ``(codes, scales, zeros)`` as described in ``format.py``."""
    codes, scales, zeros = _kernels().quantize(
        x.contiguous(), bits, group_size, symmetric, stochastic, seed & _SEED_MASK, scale_dtype == torch.bfloat16
    )
    return codes, scales, None if symmetric else zeros


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    numel: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Restore a flat tensor of ``numel`` elements in ``out_dtype`` from ``quantize``'s output."""
    out = torch.empty(numel, dtype=out_dtype, device=codes.device)
    if zeros is None:
        zeros = torch.empty(0, dtype=torch.float32, device=codes.device)
    _kernels().dequantize(codes, scales, zeros, bits, group_size, numel, out)
    return out
