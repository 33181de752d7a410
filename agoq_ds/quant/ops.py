"""The quantization ops, registered with the dispatcher per device, the way bitsandbytes does.

``agoq::quantize`` / ``agoq::dequantize`` are defined once here with ``torch.library``. Each device's
native kernels register themselves when their extension loads, in C++ (``TORCH_LIBRARY_IMPL``:
``cpu`` in ``csrc/cpu/agoq_quant.cpp``, ``cuda`` in ``csrc/cuda/agoq_quant_binding.cpp``), so a call
costs what an aten op costs; the pure-torch reference is the default kernel of every device without
one, and a fake kernel describes the outputs for ``torch.compile``/FakeTensor tracing.

The public ``quantize()`` / ``dequantize()`` below go through the ops whenever the backend
``backends.select`` picks for the device, op and width is the device's native one (``cpp`` on CPUs,
``cuda`` on GPUs), and always under ``torch.compile``. Another choice (``kernel_backend: "triton"`` or ``"torch"``, or
``backend=`` to compare backends) calls that backend's Python entry point.
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


def _quantize_reference(x, bits, group_size, symmetric, stochastic, seed, scale_dtype):
    impl = backends.get("torch")
    return _quantize_with(impl, x, bits, group_size, symmetric, stochastic, seed, scale_dtype)


def _dequantize_reference(codes, scales, zeros, bits, group_size, numel, out_dtype):
    return _dequantize_with(backends.get("torch"), codes, scales, zeros, bits, group_size, numel, out_dtype)


_lib.impl("quantize", _quantize_reference, "CompositeExplicitAutograd")
_lib.impl("dequantize", _dequantize_reference, "CompositeExplicitAutograd")

_CHECKED: set[tuple] = set()
"""Parameter combinations ``check_params`` accepted already."""

NATIVE = {"cpu": "cpp", "cuda": "cuda"}
"""Device type -> the backend whose kernels are the device's dispatcher kernels."""


def _signed64(seed: int) -> int:
    """``seed``'s low 64 bits as the schema's int64 (the kernels read the same bits as uint64)."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


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
    params = (bits, group_size, symmetric, scale_dtype)
    if params not in _CHECKED:
        check_params(bits, group_size, symmetric, scale_dtype)
        _CHECKED.add(params)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"quantize: dtype {x.dtype} not supported; use float32, bfloat16 or float16")
    if backend is None and torch.compiler.is_compiling():
        codes, scales, zeros = _quantize_op(x, bits, group_size, symmetric, stochastic, _signed64(seed), scale_dtype)
        return QuantizedTensor(codes, scales, None if symmetric else zeros, x.shape, x.dtype, bits, group_size)
    name = backend or backends.select(x.device, "quantize", bits)  # loads it: native kernels register here
    if backend is None and NATIVE.get(x.device.type) == name:
        codes, scales, zeros = _quantize_op(x, bits, group_size, symmetric, stochastic, _signed64(seed), scale_dtype)
    else:
        impl = backends.get(name)
        codes, scales, zeros = _quantize_with(impl, x, bits, group_size, symmetric, stochastic, seed, scale_dtype)
    return QuantizedTensor(codes, scales, None if symmetric else zeros, x.shape, x.dtype, bits, group_size)


def dequantize(q: QuantizedTensor, *, backend: str | None = None, flat: bool = False) -> torch.Tensor:
    """Restore a tensor of the original shape and dtype from ``q`` (``flat``: as a 1-D tensor, for
    callers that give it their own shape or strides)."""
    device = q.codes.device
    zeros = q.zeros
    if zeros is None:
        zeros = _NO_ZEROS.get(device)
        if zeros is None:
            zeros = _NO_ZEROS[device] = torch.empty(0, dtype=torch.float32, device=device)
    compiling = backend is None and torch.compiler.is_compiling()
    name = "" if compiling else backend or backends.select(device, "dequantize", q.bits)
    if compiling or (backend is None and NATIVE.get(device.type) == name):
        out = _dequantize_op(q.codes, q.scales, zeros, q.bits, q.group_size, q.numel, q.dtype)
    else:
        out = _dequantize_with(backends.get(name), q.codes, q.scales, zeros, q.bits, q.group_size, q.numel, q.dtype)
    return out if flat else out.view(tuple(q.shape))


_NO_ZEROS: dict[torch.device, torch.Tensor] = {}
"""Per device, the empty ``zeros`` input of symmetric codes (an input, so one tensor serves every call)."""
