"""Triton kernels of the blockwise quantizer (same contract as ``reference.py``, see ``format.py``).

One program handles ``ROWS`` whole groups as one contiguous ``[ROWS, GROUP]`` tile of elements, so
loads and stores are coalesced and vectorised and the input is read once. A group's codes are
``GROUP // PER`` bytes (``PER = 8 // BITS`` codes per byte): quantization splits the tile's last
axis into ``(bytes, codes of a byte)`` and ORs the codes together; dequantization interleaves the
codes of each byte back into element order.

Bit-exactness with the reference on round-to-nearest rests on four choices:

* everything is fp32: inputs are converted right after loading;
* divisions use ``tl.math.div_rn`` (IEEE), and the kernels are compiled with
  ``enable_fp_fusion=False`` so that no multiply/add pair is contracted into an FMA;
* round-half-to-even is the ``1.5 * 2**23`` magic-number trick (exact for ``|v| < 2**22``; here
  ``|v| <= 255.5``), which needs no libdevice and so also runs under ``TRITON_INTERPRET=1``;
* bf16 values (symmetric scales, bf16 outputs) are rounded to nearest-even with integer ops on the
  fp32 bit pattern, so the final store is exact whatever cast the backend (or interpreter) uses.

Stochastic rounding uses ``tl.rand(seed, element_index)`` (Philox): unbiased, reproducible for a
seed, but a different random stream than the reference's ``torch.rand``.

Runs on CUDA tensors normally; with ``TRITON_INTERPRET=1`` set before Triton is imported the same
``quantize``/``dequantize`` run on CPU tensors (used by the tests).

Importing this module defines the ops ``agoq::quantize_triton`` / ``agoq::dequantize_triton`` with
``torch.library.triton_op`` (same schemas and contract as ``agoq::quantize``/``agoq::dequantize``, see
``ops.py``); every launch goes through ``torch.library.wrap_triton``, so ``torch.compile`` sees the
Triton kernels themselves. It is imported only when the Triton backend is first asked for.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .format import TINY, num_groups, packed_bytes

_FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)
_INF: tl.constexpr = tl.constexpr(float("inf"))
_TINY: tl.constexpr = tl.constexpr(TINY)
_MAGIC: tl.constexpr = tl.constexpr(12582912.0)  # 1.5 * 2**23

BLOCK_ELEMENTS = 4096
"""Elements handled per program on the GPU (whole groups; a 4096-group takes one program)."""

INTERPRET_BLOCK_ELEMENTS = 16384
"""Elements per program under ``TRITON_INTERPRET=1`` (fewer, larger programs run faster there)."""

COMPILE_OPTIONS = {"enable_fp_fusion": False, "num_warps": 4}
"""Compile options every launch (and the ahead-of-time compile check) uses."""


@triton.jit
def _round_half_even(v):
    """Round fp32 ``v`` (``|v| < 2**22``) to the nearest integer, ties to even."""
    return (v + _MAGIC) - _MAGIC


@triton.jit
def _bf16_round(x):
    """fp32 -> the nearest bf16 value (ties to even), still as fp32; NaN stays NaN, overflow gives inf."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, b.to(tl.float32, bitcast=True))


@triton.jit
def _quantize_kernel(
    x_ptr,
    codes_ptr,
    scales_ptr,
    zeros_ptr,
    numel,
    ngroups,
    seed,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    BF16_SCALE: tl.constexpr,
):
    PER: tl.constexpr = 8 // BITS
    NBYTES: tl.constexpr = GROUP // PER
    QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
    LEVELS: tl.constexpr = (1 << BITS) - 1
    OFFSET: tl.constexpr = 1 << (BITS - 1)

    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    elem = rows[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    m = elem < numel
    # One contiguous [ROWS, GROUP] tile: coalesced (vectorised) loads, the input read once.
    x = tl.load(x_ptr + elem, mask=m, other=0.0).to(tl.float32)

    # Per-group statistics over the finite values, and a count of non-finite ones.
    ok = tl.abs(x) <= _FLT_MAX
    nbad = tl.sum(tl.where(ok, 0, 1), axis=1)
    if SYMMETRIC:
        amax = tl.max(tl.where(ok, tl.abs(x), 0.0), axis=1)
        bad = nbad > 0
        scale = tl.math.div_rn(amax, QMAX * 1.0)
        if BF16_SCALE:
            scale = _bf16_round(scale)
        flushed = amax < _TINY
        scale = tl.where(flushed, 0.0, scale)
        inv = tl.where(flushed | bad, 0.0, tl.math.div_rn(1.0, scale))
        zero = tl.zeros([ROWS], dtype=tl.float32)
        mn = zero
    else:
        mn = tl.min(tl.where(m & ok, x, _INF), axis=1)
        mx = tl.max(tl.where(m & ok, x, -_INF), axis=1)
        span = mx - mn
        bad = (nbad > 0) | ~(tl.abs(span) <= _FLT_MAX)
        scale = tl.math.div_rn(span, LEVELS * 1.0)
        flushed = span < _TINY
        inv = tl.where(flushed | bad, 0.0, tl.math.div_rn(1.0, scale))
        scale = tl.where(flushed, 0.0, scale)
        zero = tl.where(bad, 0.0, mn)

    if SYMMETRIC:
        v = x * inv[:, None]
    else:
        v = (x - zero[:, None]) * inv[:, None]
    if STOCHASTIC:
        q = tl.floor(v + tl.rand(seed, elem))
    else:
        q = _round_half_even(v)
    if SYMMETRIC:
        q = tl.minimum(tl.maximum(q, -QMAX * 1.0), QMAX * 1.0)
    else:
        q = tl.minimum(tl.maximum(q, 0.0), LEVELS * 1.0)
    q = tl.where(bad[:, None], 0.0, q).to(tl.int32)
    if SYMMETRIC and BITS < 8:
        q = q + OFFSET
    q = tl.where(m, q, 0)

    # Pack PER codes to a byte, element i of a byte in bits [i*BITS, (i+1)*BITS): split the tile's
    # last axis into (bytes, codes of a byte) and OR the codes together.
    if BITS == 8:
        packed = q
    elif BITS == 4:
        lo, hi = tl.split(tl.reshape(q, (ROWS, NBYTES, 2)))
        packed = lo | (hi << 4)
    else:
        even, odd = tl.split(tl.reshape(q, (ROWS, NBYTES, 2, 2)))  # codes 0,2 and 1,3 of each byte
        q0, q2 = tl.split(even)
        q1, q3 = tl.split(odd)
        packed = q0 | (q1 << 2) | (q2 << 4) | (q3 << 6)
    byte_idx = rows[:, None] * NBYTES + tl.arange(0, NBYTES)[None, :]
    first = byte_idx * PER
    if SYMMETRIC and BITS == 8:
        tl.store(codes_ptr + byte_idx, packed.to(tl.int8), mask=first < numel)
    else:
        tl.store(codes_ptr + byte_idx, packed.to(tl.uint8), mask=first < numel)
    rmask = rows < ngroups
    # NaN is made here, not read from a module global: Triton checks at every launch that the globals
    # a kernel read still equal their compile-time values, and NaN != NaN fails that check on a GPU.
    nan = tl.full([ROWS], float("nan"), tl.float32)
    tl.store(scales_ptr + rows, tl.where(bad, nan, scale), mask=rmask)
    if not SYMMETRIC:
        tl.store(zeros_ptr + rows, tl.where(bad, nan, mn), mask=rmask)


@triton.jit
def _dequantize_kernel(
    codes_ptr,
    scales_ptr,
    zeros_ptr,
    out_ptr,
    numel,
    ngroups,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    BF16_OUT: tl.constexpr,
):
    PER: tl.constexpr = 8 // BITS
    NBYTES: tl.constexpr = GROUP // PER
    MASK: tl.constexpr = (1 << BITS) - 1
    OFFSET: tl.constexpr = 1 << (BITS - 1)

    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    byte_idx = rows[:, None] * NBYTES + tl.arange(0, NBYTES)[None, :]
    rmask = rows < ngroups
    scale = tl.load(scales_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    if not SYMMETRIC:
        zero = tl.load(zeros_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    byte = tl.load(codes_ptr + byte_idx, mask=byte_idx * PER < numel, other=0).to(tl.int32)
    # Unpack into one contiguous [ROWS, GROUP] tile (codes interleaved back into element order), so
    # the output is written with coalesced, vectorised stores.
    if BITS == 8:
        q = byte  # int8 codes sign-extend, uint8 codes zero-extend
    elif BITS == 4:
        q = tl.interleave(byte & MASK, (byte >> 4) & MASK)
    else:
        q = tl.interleave(
            tl.interleave(byte & MASK, (byte >> 4) & MASK), tl.interleave((byte >> 2) & MASK, (byte >> 6) & MASK)
        )
    if SYMMETRIC and BITS < 8:
        q = q - OFFSET
    x = q.to(tl.float32) * scale[:, None]
    if not SYMMETRIC:
        x = x + zero[:, None]
    if BF16_OUT:
        x = _bf16_round(x)
    elem = rows[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    tl.store(out_ptr + elem, x, mask=elem < numel)


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def rows_per_program(group_size: int, block_elements: int | None = None) -> int:
    """Groups handled by one program: ``block_elements // group_size`` (at least 1)."""
    if block_elements is None:
        block_elements = INTERPRET_BLOCK_ELEMENTS if interpret_mode() else BLOCK_ELEMENTS
    return max(1, block_elements // group_size)


def _launch_options() -> dict:
    # The interpreter rejects compile options; fusion is irrelevant there (numpy rounds every op).
    return {} if interpret_mode() else dict(COMPILE_OPTIONS)


def _no_zeros(scales: torch.Tensor) -> torch.Tensor:
    """The ``zeros_ptr`` of symmetric codes (never read or written): an empty tensor of the scales'
    dtype, not ``scales`` itself, so that no two pointer arguments alias (``torch.compile`` clones
    the arguments a launch may write, and an alias would lose the writes through the other one)."""
    return scales.new_empty(0)


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    stochastic: bool,
    seed: int,
    scale_dtype: torch.dtype,
    block_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize ``x`` on its device; returns ``(codes, scales, zeros)`` exactly as ``reference.quantize``.

    ``block_elements`` overrides the elements handled per program (tests use it to cover tiling).
    """
    flat = x.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    numel = flat.numel()
    ngroups = num_groups(numel, group_size)
    code_dtype = torch.int8 if bits == 8 and symmetric else torch.uint8
    codes = torch.empty(packed_bytes(numel, bits), dtype=code_dtype, device=x.device)
    scales = torch.empty(ngroups, dtype=scale_dtype, device=x.device)
    zeros = None if symmetric else torch.empty(ngroups, dtype=torch.float32, device=x.device)
    if numel == 0:
        return codes, scales, zeros
    rows = rows_per_program(group_size, block_elements)
    grid = (triton.cdiv(ngroups, rows),)
    wrap_triton(_quantize_kernel)[grid](
        flat,
        codes,
        scales,
        _no_zeros(scales) if zeros is None else zeros,
        numel,
        ngroups,
        seed & 0x7FFF_FFFF_FFFF_FFFF,
        BITS=bits,
        GROUP=group_size,
        ROWS=rows,
        SYMMETRIC=symmetric,
        STOCHASTIC=stochastic,
        BF16_SCALE=scale_dtype == torch.bfloat16,
        **_launch_options(),
    )
    return codes, scales, zeros


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    numel: int,
    out_dtype: torch.dtype,
    block_elements: int | None = None,
) -> torch.Tensor:
    """Restore a flat tensor of ``numel`` elements in ``out_dtype``, exactly as ``reference.dequantize``."""
    out = torch.empty(numel, dtype=out_dtype, device=codes.device)
    if numel == 0:
        return out
    if bits == 8 and zeros is None and codes.dtype != torch.int8:
        codes = codes.view(torch.int8)
    if codes.dtype not in (torch.int8, torch.uint8):
        codes = codes.to(torch.uint8)
    ngroups = num_groups(numel, group_size)
    rows = rows_per_program(group_size, block_elements)
    grid = (triton.cdiv(ngroups, rows),)
    wrap_triton(_dequantize_kernel)[grid](
        codes.contiguous(),
        scales.contiguous(),
        _no_zeros(scales) if zeros is None else zeros.contiguous(),
        out,
        numel,
        ngroups,
        BITS=bits,
        GROUP=group_size,
        ROWS=rows,
        SYMMETRIC=zeros is None,
        BF16_OUT=out_dtype == torch.bfloat16,
        **_launch_options(),
    )
    return out


def _define_op(name: str, fake):
    """``triton_op(name)``: ``torch.compile`` traces into the function and sees the Triton kernels.

    The interpreter's kernels (``TRITON_INTERPRET=1``) are plain Python that cannot be traced
    (``wrap_triton`` hands them back unwrapped): there the same function becomes an opaque
    ``custom_op`` with the ops' fake kernel, so the interpreted op works under ``torch.compile`` too.
    """

    def define(fn):
        if not interpret_mode():
            return triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fake)
        return op

    return define


def _quantize_fake(*args):
    from .ops import quantize_fake

    return quantize_fake(*args)


def _dequantize_fake(*args):
    from .ops import dequantize_fake

    return dequantize_fake(*args)


@_define_op("agoq::quantize_triton", _quantize_fake)
def quantize_op(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    stochastic: bool,
    seed: int,
    scale_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``agoq::quantize_triton``: ``quantize`` as an op (symmetric: an empty ``zeros`` stands in)."""
    codes, scales, zeros = quantize(x, bits, group_size, symmetric, stochastic, seed, scale_dtype)
    return codes, scales, zeros if zeros is not None else scales.new_empty(0, dtype=torch.float32)


@_define_op("agoq::dequantize_triton", _dequantize_fake)
def dequantize_op(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    numel: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``agoq::dequantize_triton``: ``dequantize`` as an op (an empty ``zeros``: symmetric codes)."""
    return dequantize(codes, scales, zeros if zeros.numel() else None, bits, group_size, numel, out_dtype)


def unavailable_reason() -> str | None:
    """``None`` when Triton kernels can run here (a CUDA device is present, or the interpreter runs
    them on CPU tensors: ``TRITON_INTERPRET=1``), else why not."""
    if not torch.cuda.is_available() and not interpret_mode():
        if torch.version.cuda is None:
            return f"no GPU: torch {torch.__version__} is a CPU-only build (Triton kernels need a CUDA device)"
        return "no GPU: torch.cuda.is_available() is False (Triton kernels need a CUDA device)"
    return None


def describe() -> str:
    """One line: Triton version, device and tiling."""
    where = "interpreter (TRITON_INTERPRET=1)" if interpret_mode() else torch.cuda.get_device_name()
    return f"triton {triton.__version__} on {where}, {BLOCK_ELEMENTS} elements per program"


__all__ = [
    "BLOCK_ELEMENTS",
    "COMPILE_OPTIONS",
    "INTERPRET_BLOCK_ELEMENTS",
    "dequantize",
    "dequantize_op",
    "describe",
    "interpret_mode",
    "quantize",
    "quantize_op",
    "rows_per_program",
    "unavailable_reason",
]
