"""The quantization ops, registered with the dispatcher per device, the way bitsandbytes does.

``agoq::quantize`` / ``agoq::dequantize`` are defined once with ``torch.library``; each device type
has its own kernel (``cpu``: the C++ kernels, ``cuda``: the CUDA or Triton kernels, as
``backends.select`` picks for that device), the pure-torch reference is the default for every other
device, and a fake kernel describes the outputs for ``torch.compile``/FakeTensor tracing. The public
``quantize()`` / ``dequantize()`` below always go through the ops, eager or compiled, so a call costs
one dispatcher lookup on top of the kernel; ``backend=`` calls one named backend directly instead
(to compare backends).
"""

from __future__ import annotations

import torch

from . import backends
from .format import QuantizedTensor, check_params, num_groups, packed_bytes

_lib = torch.library.Library("agoq", "DEF")  # kept for the life of the process
_lib.define(
    "quantize(Tensor x, int bits, int group_size, bool symmetric, bool stochastic, int seed, ScalarType scale_dtype)"
    " -> (Tensor, Tensor, Tensor)"
)
_lib.define(
    "dequantize(Tensor codes, Tensor scales, Tensor zeros, int bits, int group_size, int numel, ScalarType out_dtype)"
    " -> Tensor"
)


def _quantize_with(impl, x, bits, group_size, symmetric, stochastic, seed, scale_dtype):
    codes, scales, zeros = impl.quantize(x.contiguous(), bits, group_size, symmetric, stochastic, seed, scale_dtype)
    # An op returns tensors only: symmetric quantization has no zeros, an empty tensor stands in.
    return codes, scales, zeros if zeros is not None else scales.new_empty(0, dtype=torch.float32)


def _dequantize_with(impl, codes, scales, zeros, bits, group_size, numel, out_dtype):
    return impl.dequantize(codes, scales, zeros if zeros.numel() else None, bits, group_size, numel, out_dtype)


def _quantize_selected(x, bits, group_size, symmetric, stochastic, seed, scale_dtype):
    impl = backends.get(backends.select(x.device))
    return _quantize_with(impl, x, bits, group_size, symmetric, stochastic, seed, scale_dtype)


def _dequantize_selected(codes, scales, zeros, bits, group_size, numel, out_dtype):
    impl = backends.get(backends.select(codes.device))
    return _dequantize_with(impl, codes, scales, zeros, bits, group_size, numel, out_dtype)


def _quantize_reference(x, bits, group_size, symmetric, stochastic, seed, scale_dtype):
    impl = backends.get("torch")
    return _quantize_with(impl, x, bits, group_size, symmetric, stochastic, seed, scale_dtype)


def _dequantize_reference(codes, scales, zeros, bits, group_size, numel, out_dtype):
    return _dequantize_with(backends.get("torch"), codes, scales, zeros, bits, group_size, numel, out_dtype)


# Plain ``Library.impl`` registrations: ``torch.library.register_kernel`` wraps each call in more Python.
for _key in ("CPU", "CUDA"):
    _lib.impl("quantize", _quantize_selected, _key)
    _lib.impl("dequantize", _dequantize_selected, _key)
_lib.impl("quantize", _quantize_reference, "CompositeExplicitAutograd")
_lib.impl("dequantize", _dequantize_reference, "CompositeExplicitAutograd")


@torch.library.register_fake("agoq::quantize")
def _(x, bits, group_size, symmetric, stochastic, seed, scale_dtype):
    n = x.numel()
    code_dtype = torch.int8 if bits == 8 and symmetric else torch.uint8
    g = num_groups(n, group_size)
    codes = x.new_empty(packed_bytes(n, bits), dtype=code_dtype)
    return codes, x.new_empty(g, dtype=scale_dtype), x.new_empty(0 if symmetric else g, dtype=torch.float32)


@torch.library.register_fake("agoq::dequantize")
def _(codes, scales, zeros, bits, group_size, numel, out_dtype):
    return codes.new_empty(numel, dtype=out_dtype)


_quantize_op = torch.ops.agoq.quantize.default
_dequantize_op = torch.ops.agoq.dequantize.default


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
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"quantize: dtype {x.dtype} not supported; use float32, bfloat16 or float16")
    if backend is None:
        codes, scales, zeros = _quantize_op(x, bits, group_size, symmetric, stochastic, seed, scale_dtype)
    else:
        impl = backends.get(backend)
        codes, scales, zeros = _quantize_with(impl, x, bits, group_size, symmetric, stochastic, seed, scale_dtype)
    return QuantizedTensor(codes, scales, None if symmetric else zeros, x.shape, x.dtype, bits, group_size)


def dequantize(q: QuantizedTensor, *, backend: str | None = None) -> torch.Tensor:
    """Restore a tensor of the original shape and dtype from ``q``."""
    zeros = q.zeros if q.zeros is not None else q.scales.new_empty(0, dtype=torch.float32)
    if backend is None:
        flat = _dequantize_op(q.codes, q.scales, zeros, q.bits, q.group_size, q.numel, q.dtype)
    else:
        flat = _dequantize_with(backends.get(backend), q.codes, q.scales, zeros, q.bits, q.group_size, q.numel, q.dtype)
    return flat.view(q.shape)
