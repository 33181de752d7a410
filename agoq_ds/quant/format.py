"""The blockwise quantized format shared by every backend.

A tensor is flattened (row-major) and cut into groups of ``group_size`` consecutive elements; the
last group may be shorter. Each group gets one scale (and, for the asymmetric variant, one zero
point = the group minimum). Codes are packed ``8 // bits`` per byte, element ``i`` of a byte in bits
``[i * bits, (i + 1) * bits)`` (little end first).

Symmetric (absmax), ``qmax = 2**(bits-1) - 1``::

    scale = absmax / qmax          (stored in ``scale_dtype``; ``s`` = the stored value)
    q     = clamp(round(x * (1 / s)), -qmax, qmax)
    x'    = q * s

8-bit symmetric codes are stored as ``torch.int8`` (the value ``q`` itself), packed widths as
``uint8`` codes ``q + 2**(bits-1)``.

Asymmetric (min/max), ``levels = 2**bits - 1``, for one-signed tensors::

    scale = (max - min) / levels,  zero = min   (both fp32)
    q     = clamp(round((x - zero) * (1 / scale)), 0, levels)
    x'    = q * scale + zero

Rounding is round-half-to-even (``torch.round``) or stochastic ``floor(v + u)``, ``u ~ U[0, 1)``.
All arithmetic is fp32 whatever the input dtype, so backends agree bit for bit on round-to-nearest.

Special groups (identical in every backend):

* A group holding NaN or +-Inf gets scale NaN and codes 0: it dequantizes to all-NaN, so
  non-finite values are never turned into finite ones.
* A group whose absmax (symmetric) or range (asymmetric) is below ``TINY = 2**-100`` gets scale 0:
  symmetric groups dequantize to zeros (all-zero groups give exact zeros, never NaN), asymmetric
  ones to their minimum. ``1 / s`` cannot overflow and ``s`` stays a normal fp32 number for any larger scale.

Round-to-nearest error bound per element of a finite group: ``|x - x'| <= s / 2`` with a tiny
slack for fp32 rounding of ``x * (1/s)`` (``bound()`` returns it), or ``<= TINY`` for flushed groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 4, 8)
"""Code widths every backend implements."""

GROUP_SIZES = tuple(2**k for k in range(5, 13))
"""Allowed group sizes: powers of two from 32 to 4096."""

SCALE_DTYPES = (torch.float32, torch.bfloat16)
"""Allowed storage types of symmetric scales (asymmetric scales and zeros are always fp32)."""

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Floating types that can be quantized; dequantization returns the same type."""

TINY = 2.0**-100
"""Groups whose absmax (or range) is below this are flushed (scale 0)."""


def qmax(bits: int) -> int:
    """Largest symmetric code magnitude for ``bits``: 127, 7 or 1."""
    return 2 ** (bits - 1) - 1


def levels(bits: int) -> int:
    """Largest asymmetric code for ``bits``: 255, 15 or 3."""
    return 2**bits - 1


def num_groups(numel: int, group_size: int) -> int:
    """Number of groups (scales) for ``numel`` elements."""
    return -(-numel // group_size)


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes holding ``numel`` codes of ``bits`` each."""
    per_byte = 8 // bits
    return -(-numel // per_byte)


def quantized_bytes(numel: int, bits: int, group_size: int, scale_bytes: int) -> int:
    """Bytes of ``numel`` elements stored symmetric at ``bits``: packed codes plus one scale per group."""
    return packed_bytes(numel, bits) + num_groups(numel, group_size) * scale_bytes


def check_params(bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype) -> None:
    """Raise ``ValueError`` naming the bad argument and the allowed values."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits}: must be one of {', '.join(map(str, SUPPORTED_BITS))}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size}: must be one of {', '.join(map(str, GROUP_SIZES))}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype={scale_dtype}: must be one of torch.float32, torch.bfloat16")
    if not symmetric and scale_dtype != torch.float32:
        raise ValueError("scale_dtype: asymmetric quantization stores fp32 scales and zeros")


@dataclass
class QuantizedTensor:
    """A tensor in blockwise quantized form, plus what is needed to restore it."""

    codes: torch.Tensor
    """Packed codes, 1-D: int8 for 8-bit symmetric, uint8 otherwise."""
    scales: torch.Tensor
    """One scale per group, 1-D, ``scale_dtype``."""
    zeros: torch.Tensor | None
    """Per-group minimum (asymmetric only), 1-D fp32; ``None`` for symmetric."""
    shape: torch.Size
    """Shape of the original tensor."""
    dtype: torch.dtype
    """Floating type of the original tensor (and of the dequantized result)."""
    bits: int
    """Code width: 2, 4 or 8."""
    group_size: int
    """Elements per group."""

    @property
    def symmetric(self) -> bool:
        """True for absmax quantization, False for min/max."""
        return self.zeros is None

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes actually held: codes + scales (+ zeros)."""
        total = self.codes.numel() * self.codes.element_size()
        total += self.scales.numel() * self.scales.element_size()
        if self.zeros is not None:
            total += self.zeros.numel() * self.zeros.element_size()
        return total

    @property
    def bits_per_element(self) -> float:
        """Stored bits per original element, scales included (0 for an empty tensor)."""
        return 8.0 * self.nbytes / self.numel if self.numel else 0.0


def bound(q: QuantizedTensor) -> torch.Tensor:
    """Per-group round-to-nearest error bound (fp32, one entry per group).

    ``s / 2`` plus slack for the fp32 product ``x * (1/s)`` (relative error <= 2**-23 of a value up
    to ``qmax + 1/2``), or ``TINY`` for flushed groups; NaN for non-finite groups. Evaluated in fp64
    so that the slack terms cannot overflow for scales near the fp32 maximum.
    """
    s = q.scales.double()
    if q.symmetric:
        top = qmax(q.bits) + 0.5
    else:
        top = levels(q.bits) + 0.5
    slack = s * top * 2.0**-22
    b = s / 2 + slack
    if not q.symmetric:
        # q * s + zero is rounded once more in fp32.
        b = b + (q.zeros.double().abs() + s * levels(q.bits)) * 2.0**-23
    return torch.where(s == 0, torch.full_like(b, TINY), b).float()


def stochastic_bound(q: QuantizedTensor) -> torch.Tensor:
    """Per-group error bound for stochastic rounding: one full step ``s`` (+ the same slack)."""
    return bound(q) * 2
