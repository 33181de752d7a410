"""In-place int8 accumulation ops for the gradient path: ``agoq::dequantize_add_`` / ``agoq::requantize_add_``.

``dequantize_add_(out, q)``: ``out += dequantize(q)``. ``requantize_add_(...)``: int8 codes and fp32
scales become ``quantize(dequantize(codes, scales) + addend)``. Both are defined as exactly that
composition of ``quantize``/``dequantize`` (same fp32 roundings, same stochastic-rounding draws for
the same seed). They are dispatcher ops (schemas, fake kernels and the composition as the default
kernel in ``ops.py``, ``Tensor(a!)`` for what they write); the C++ extension registers fused
``CPU`` kernels that run as one pass without full-size temporaries (``csrc/cpu/agoq_accumulate.h``).
The functions below call the op when the chosen backend is the device's native one (``cpp`` on
CPUs, ``cuda`` on GPUs, where the default kernel composes the CUDA kernels), and the composition
with the chosen backend's ops otherwise (``triton``, ``torch``). Only symmetric 8-bit codes with
fp32 scales, the gradient format, go through the ops.
"""

from __future__ import annotations

import torch

from . import backends
from .format import QuantizedTensor
from .ops import DISPATCHER, NATIVE, _signed64, backend_for, dequantize, quantize

FALLBACK_CHUNK = 1 << 24
"""Elements requantized at a time where no fused kernel runs (bounds its fp32 temporaries)."""


def _through_op(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` on ``device`` runs the dispatcher's ops (native kernels or their default)."""
    return name == DISPATCHER or NATIVE.get(device.type) == name


def _fusable(q: QuantizedTensor) -> bool:
    return q.bits == 8 and q.zeros is None and q.codes.dtype == torch.int8 and q.scales.dtype == torch.float32


def dequantize_add_(
    out: torch.Tensor,
    q: QuantizedTensor,
    *,
    backend: str | None = None,
    kernels: backends.Kernels | None = None,
) -> torch.Tensor:
    """``out += dequantize(q)`` in place (``out``: contiguous fp32 with ``q.numel`` elements); returns ``out``."""
    if out.numel() != q.numel:
        raise ValueError(f"dequantize_add_: out has {out.numel()} elements, q holds {q.numel}")
    name = backend_for(out.device, "dequantize", q.bits, backend, kernels)
    if _through_op(name, out.device) and _fusable(q) and out.dtype == torch.float32 and out.is_contiguous():
        torch.ops.agoq.dequantize_add_.default(out, q.codes.contiguous(), q.scales.contiguous(), q.group_size)
        return out
    return out.add_(dequantize(q, backend=name).view(out.shape))


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
    kernels: backends.Kernels | None = None,
) -> None:
    """In place: ``codes``/``scales`` (int8, fp32; contiguous) := ``quantize(D + addend)``.

    ``D`` is their dequantized value when ``has_value``, else zero (the first addition after a
    reset reads nothing). ``addend`` is 1-D fp32, bf16 or fp16 with ``codes.numel()`` elements.
    Non-finite groups get a NaN scale, as ``quantize`` gives them.
    """
    n = addend.numel()
    if codes.numel() != n:
        raise ValueError(f"requantize_add_: {codes.numel()} codes for an addend of {n} elements")
    name = backend_for(codes.device, "quantize", 8, backend, kernels)
    if _through_op(name, codes.device):
        if addend.dtype not in (torch.float32, torch.bfloat16):
            addend = addend.float()  # exact; the composition adds in fp32 all the same
        torch.ops.agoq.requantize_add_.default(
            codes, scales, addend.contiguous(), has_value, group_size, stochastic, _signed64(seed)
        )
        return
    requantize_add_composed(codes, scales, addend, has_value, group_size, stochastic, seed, name)


def requantize_add_composed(
    codes: torch.Tensor,
    scales: torch.Tensor,
    addend: torch.Tensor,
    has_value: bool,
    group_size: int,
    stochastic: bool,
    seed: int,
    backend: str,
) -> None:
    """``requantize_add_`` as its definition: ``quantize``/``dequantize`` of ``backend``, chunk by chunk
    (group-aligned), so the fp32 temporaries stay at ``FALLBACK_CHUNK`` elements, not the span's (a
    whole gradient bucket on a GPU). Stochastic draws are per chunk. The default kernel of
    ``agoq::requantize_add_`` (``backend`` = ``"dispatcher"``)."""
    n = addend.numel()
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
