"""In-place int8 accumulation ops for the gradient path, fused where the C++ kernels run.

``dequantize_add_(out, q)``: ``out += dequantize(q)``. ``requantize_add_(...)``: int8 codes and fp32
scales become ``quantize(dequantize(codes, scales) + addend)``. Both are defined as exactly that
composition of ``quantize``/``dequantize`` (same fp32 roundings, same stochastic-rounding draws for
the same seed), which is what every backend without a fused kernel runs; on CPU tensors with the
C++ backend selected they run as one pass without full-size temporaries (``csrc/cpu/agoq_accumulate.h``).
Only symmetric 8-bit codes with fp32 scales, the gradient format, are fused.
"""

from __future__ import annotations

import torch

from . import backends
from .format import QuantizedTensor
from .ops import dequantize, quantize

FALLBACK_CHUNK = 1 << 24
"""Elements requantized at a time where no fused kernel runs (bounds its fp32 temporaries)."""


def _cpp_kernels(*tensors: torch.Tensor, backend: str | None):
    """The C++ backend when it handles these (CPU) tensors, else ``None``."""
    name = backend or backends.select(tensors[0].device)
    if name != "cpp" or torch.compiler.is_compiling() or any(t.device.type != "cpu" for t in tensors):
        return None
    return backends.get("cpp")


def _fusable(q: QuantizedTensor) -> bool:
    return q.bits == 8 and q.zeros is None and q.codes.dtype == torch.int8 and q.scales.dtype == torch.float32


def dequantize_add_(out: torch.Tensor, q: QuantizedTensor, *, backend: str | None = None) -> torch.Tensor:
    """``out += dequantize(q)`` in place (``out``: contiguous fp32 with ``q.numel`` elements); returns ``out``."""
    if out.numel() != q.numel:
        raise ValueError(f"dequantize_add_: out has {out.numel()} elements, q holds {q.numel}")
    kernels = _cpp_kernels(out, q.codes, backend=backend)
    if kernels is not None and _fusable(q) and out.dtype == torch.float32 and out.is_contiguous():
        kernels.dequantize_add_(q.codes.contiguous(), q.scales.contiguous(), q.group_size, out)
        return out
    return out.add_(dequantize(q, backend=backend).view(out.shape))


def requantize_add_(
    codes: torch.Tensor,
    scales: torch.Tensor,
    addend: torch.Tensor,
    *,
    has_value: bool,
    group_size: int,
    stochastic: bool,
    seed: int,
    backend: str | None = None,
) -> None:
    """In place: ``codes``/``scales`` (int8, fp32; contiguous) := ``quantize(D + addend)``.

    ``D`` is their dequantized value when ``has_value``, else zero (the first addition after a
    reset reads nothing). ``addend`` is 1-D fp32 or bf16 with ``codes.numel()`` elements.
    Non-finite groups get a NaN scale, as ``quantize`` gives them.
    """
    n = addend.numel()
    if codes.numel() != n:
        raise ValueError(f"requantize_add_: {codes.numel()} codes for an addend of {n} elements")
    kernels = _cpp_kernels(codes, scales, addend, backend=backend)
    if kernels is not None and addend.dtype in (torch.float32, torch.bfloat16):
        kernels.requantize_add_(codes, scales, addend.contiguous(), has_value, group_size, stochastic, seed)
        return
    # Chunk by chunk (group-aligned): the fp32 temporaries stay at FALLBACK_CHUNK elements, not the
    # span's (a whole gradient bucket on a GPU). Stochastic draws are per chunk.
    step = max(group_size, FALLBACK_CHUNK // group_size * group_size)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        g0, g1 = lo // group_size, -(-hi // group_size)
        part = addend[lo:hi]
        if has_value:
            current = QuantizedTensor(
                codes[lo:hi], scales[g0:g1], None, torch.Size([hi - lo]), torch.float32, 8, group_size
            )
            x = dequantize(current, backend=backend).add_(part)
        else:
            x = part.float() if part.dtype != torch.float32 else part
        q = quantize(
            x, 8, group_size, stochastic=stochastic, seed=seed if lo == 0 else (seed + lo) % (2**31), backend=backend
        )
        codes[lo:hi].copy_(q.codes)
        scales[g0:g1].copy_(q.scales)
