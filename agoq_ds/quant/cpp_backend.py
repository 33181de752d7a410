"""C++/OpenMP CPU kernels (``csrc/cpu``) as a quantization backend.

Same ``quantize``/``dequantize`` as ``reference.py``, bit-exact with it for round-to-nearest.
Stochastic rounding draws its noise from a counter-based hash of ``(seed, group, index)`` (not from
torch's generator), so it is deterministic for a seed and independent of the thread count, but
differs from the reference's draws.

The compiled module is obtained once per process (thread-safe) by ``native.NativeLoader`` with
``builder.CPUQuantBuilder``: the install-time build if present, else a JIT build (tens of seconds
the first time, cached in ``TORCH_EXTENSIONS_DIR``). If both fail the backend reports itself
unavailable and the registry uses the pure-torch reference. Environment variables (read at first use):

* ``AGOQ_DISABLE_CPP=1``: never load the C++ kernels (pure-torch fallback).
* ``AGOQ_CPP_PREBUILT=0``: ignore the install-time build, JIT-build instead.
* ``AGOQ_CPP_JIT=0``: never JIT-build.
"""

from __future__ import annotations

import torch

from .native import NativeLoader


def _builder():
    from .builder import CPUQuantBuilder

    return CPUQuantBuilder()


_SEED_MASK = (1 << 64) - 1
_loader = NativeLoader("C++", _builder)
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
    """Quantize ``x`` (CPU); returns ``(codes, scales, zeros)`` as described in ``format.py``."""
    codes, scales, zeros = _kernels().quantize(
        x, bits, group_size, symmetric, stochastic, seed & _SEED_MASK, scale_dtype
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
    if zeros is None:
        zeros = torch.empty(0, dtype=torch.float32)
    return _kernels().dequantize(codes, scales, zeros, bits, group_size, numel, out_dtype)


def quantize_into(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    symmetric: bool,
    stochastic: bool,
    seed: int,
) -> None:
    """Like ``quantize`` but writes into preallocated contiguous ``codes``/``scales``/``zeros``.

    They must have exactly the sizes and dtypes ``quantize`` would return (the scale dtype is
    ``scales.dtype``); ``zeros`` is ``None`` for symmetric quantization. Avoids allocating (and
    page-faulting) fresh output memory on every call, e.g. for reused communication buffers.
    """
    if zeros is None:
        zeros = torch.empty(0, dtype=torch.float32)
    _kernels().quantize_into(x, codes, scales, zeros, bits, group_size, symmetric, stochastic, seed & _SEED_MASK)


def dequantize_into(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Like ``dequantize`` but writes into the preallocated contiguous ``out`` (its numel and dtype); returns it."""
    if zeros is None:
        zeros = torch.empty(0, dtype=torch.float32)
    _kernels().dequantize_into(codes, scales, zeros, bits, group_size, out)
    return out


def dequantize_add_(codes: torch.Tensor, scales: torch.Tensor, group_size: int, out: torch.Tensor) -> None:
    """``out += dequantize`` of symmetric int8 ``codes`` with fp32 ``scales``, in place (``out``: contiguous fp32)."""
    _kernels().dequantize_add_(codes, scales, group_size, out)


def requantize_add_(
    codes: torch.Tensor,
    scales: torch.Tensor,
    addend: torch.Tensor,
    has_value: bool,
    group_size: int,
    stochastic: bool,
    seed: int,
) -> None:
    """In place: int8 ``codes`` / fp32 ``scales`` := quantize((dequantized if ``has_value`` else 0) + ``addend``)."""
    _kernels().requantize_add_(codes, scales, addend, has_value, group_size, stochastic, seed & _SEED_MASK)
