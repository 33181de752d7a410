"""The quantization ops, declared once with ``torch.library`` and dispatched to a backend.

``agoq::quantize`` / ``agoq::dequantize`` are real custom ops (usable under ``torch.compile``, with
fake kernels for tracing); their implementation asks ``backends.select`` which kernels handle the
tensor's device. ``quantize()`` / ``dequantize()`` below are the public Python API: under
``torch.compile`` they emit the custom ops, in eager mode they call the selected kernels directly.
"""

from __future__ import annotations

import torch

from . import backends
from .format import QuantizedTensor, check_params, num_groups, packed_bytes


@torch.library.custom_op("agoq::quantize", mutates_args=())
def _quantize_op(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    stochastic: bool,
    seed: int,
    scale_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = backends.get(backends.select(x.device))
    codes, scales, zeros = impl.quantize(x.contiguous(), bits, group_size, symmetric, stochastic, seed, scale_dtype)
    return codes, scales, zeros if zeros is not None else scales.new_empty(0, dtype=torch.float32)


@_quantize_op.register_fake
def _(x, bits, group_size, symmetric, stochastic, seed, scale_dtype):
    n = x.numel()
    code_dtype = torch.int8 if bits == 8 and symmetric else torch.uint8
    g = num_groups(n, group_size)
    codes = x.new_empty(packed_bytes(n, bits), dtype=code_dtype)
    return codes, x.new_empty(g, dtype=scale_dtype), x.new_empty(0 if symmetric else g, dtype=torch.float32)


@torch.library.custom_op("agoq::dequantize", mutates_args=())
def _dequantize_op(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    numel: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    impl = backends.get(backends.select(codes.device))
    return impl.dequantize(codes, scales, zeros if zeros.numel() else None, bits, group_size, numel, out_dtype)


@_dequantize_op.register_fake
def _(codes, scales, zeros, bits, group_size, numel, out_dtype):
    return codes.new_empty(numel, dtype=out_dtype)


def quantize(
    x: torch.Tensor,
    bits: int = 8,
    group_size: int = 128,
    *,
    symmetric: bool = True,
    stochastic: bool = False,
    seed: int = 0,
    scale_dtype: torch.dtype = torch.float32,
    backend: str | None = None,
) -> QuantizedTensor:
    """Blockwise-quantize ``x`` (fp32/bf16/fp16, any shape) to ``bits`` per element.

    ``symmetric`` selects absmax (signed codes) or min/max (for one-signed tensors); ``stochastic``
    selects unbiased stochastic rounding driven by ``seed``. ``backend`` forces one backend (by
    name) instead of the automatic per-device choice. NaN/Inf are preserved (see ``format.py``).
    """
    check_params(bits, group_size, symmetric, scale_dtype)
    if not x.is_floating_point() or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"quantize: dtype {x.dtype} not supported; use float32, bfloat16 or float16")
    if backend is None and torch.compiler.is_compiling():
        codes, scales, zeros = _quantize_op(x, bits, group_size, symmetric, stochastic, seed, scale_dtype)
        zeros_or_none = None if symmetric else zeros
    else:
        # Eager calls go straight to the kernels: the custom-op dispatch costs ~0.5 ms per call,
        # more than quantizing a typical saved activation.
        impl = backends.get(backend or backends.select(x.device))
        codes, scales, zeros_or_none = impl.quantize(
            x.contiguous(), bits, group_size, symmetric, stochastic, seed, scale_dtype
        )
    return QuantizedTensor(codes, scales, zeros_or_none, x.shape, x.dtype, bits, group_size)


def dequantize(q: QuantizedTensor, *, backend: str | None = None) -> torch.Tensor:
    """Restore a tensor of the original shape and dtype from ``q``."""
    if backend is None and torch.compiler.is_compiling():
        zeros = q.zeros if q.zeros is not None else q.scales.new_empty(0, dtype=torch.float32)
        flat = _dequantize_op(q.codes, q.scales, zeros, q.bits, q.group_size, q.numel, q.dtype)
    else:
        impl = backends.get(backend or backends.select(q.codes.device))
        flat = impl.dequantize(q.codes, q.scales, q.zeros, q.bits, q.group_size, q.numel, q.dtype)
    return flat.view(q.shape)
