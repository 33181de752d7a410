"""Triton kernels that dequantize stored spans and rebuild recomputed tensors in the same pass.

Backward rebuilds a LLaMA block's norm outputs and gating products from stored spans
(``activation/recipe.py``). Unfused, that is a dequantize kernel per source (codes read, the full
tensor written) and then one kernel per op of the recipe (the full tensors read and written again).
These kernels read the codes once and write every tensor backward reads:

* ``norm``: ``h = dt(x * rstd)`` and ``y = w * h`` from the stored RMSNorm input ``x`` (its codes) and
  its exact row statistic ``rstd``; optionally ``x`` itself, which the norm's own backward reads.
* ``gate``: ``s = silu(g)`` and ``p = s * u`` from the stored gate and up outputs (their codes);
  optionally ``g`` and ``u`` themselves, which SiLU's and the product's backward read.

Every value is rounded where the unfused path rounds it (dequantize to the span's dtype, each op's
result to its dtype), with the same fp32 arithmetic (``enable_fp_fusion=False``: no FMA), so the
results equal the unfused path's but for the last bit of ``exp`` in SiLU. Codes are symmetric, 2, 4
or 8 bits, in the layout of ``format.py``. Runs on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_backend import _bf16_round, _launch_options

BLOCK = 1024
"""Elements per program."""


@triton.jit
def _dequantize_at(codes_ptr, scales_ptr, offs, mask, BITS: tl.constexpr, GROUP: tl.constexpr, BF16: tl.constexpr):
    """Dequantized values (fp32, rounded to bf16 if the span is bf16) of flat elements ``offs``."""
    if BITS == 8:
        q = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.float32)
    else:
        PER: tl.constexpr = 8 // BITS
        byte = tl.load(codes_ptr + offs // PER, mask=mask, other=0).to(tl.int32)
        q = ((byte >> ((offs % PER) * BITS)) & ((1 << BITS) - 1)) - (1 << (BITS - 1))
        q = q.to(tl.float32)
    x = q * tl.load(scales_ptr + offs // GROUP, mask=mask, other=0.0).to(tl.float32)
    if BF16:
        x = _bf16_round(x)
    return x


@triton.jit
def _norm_kernel(
    codes_ptr,
    scales_ptr,
    stat_ptr,
    weight_ptr,
    h_ptr,
    y_ptr,
    x_ptr,
    numel,
    hidden,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    X_BF16: tl.constexpr,
    H_BF16: tl.constexpr,
    Y_BF16: tl.constexpr,
    WRITE_Y: tl.constexpr,
    WRITE_X: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = _dequantize_at(codes_ptr, scales_ptr, offs, mask, BITS, GROUP, X_BF16)
    if WRITE_X:
        tl.store(x_ptr + offs, x, mask=mask)
    h = x * tl.load(stat_ptr + offs // hidden, mask=mask, other=0.0).to(tl.float32)
    if H_BF16:
        h = _bf16_round(h)
    tl.store(h_ptr + offs, h, mask=mask)
    if WRITE_Y:
        y = tl.load(weight_ptr + offs % hidden, mask=mask, other=0.0).to(tl.float32) * h
        if Y_BF16:
            y = _bf16_round(y)
        tl.store(y_ptr + offs, y, mask=mask)


@triton.jit
def _gate_kernel(
    g_codes_ptr,
    g_scales_ptr,
    u_codes_ptr,
    u_scales_ptr,
    s_ptr,
    p_ptr,
    g_ptr,
    u_ptr,
    numel,
    G_BITS: tl.constexpr,
    G_GROUP: tl.constexpr,
    U_BITS: tl.constexpr,
    U_GROUP: tl.constexpr,
    BF16: tl.constexpr,
    WRITE_P: tl.constexpr,
    WRITE_G: tl.constexpr,
    WRITE_U: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = _dequantize_at(g_codes_ptr, g_scales_ptr, offs, mask, G_BITS, G_GROUP, BF16)
    if WRITE_G:
        tl.store(g_ptr + offs, g, mask=mask)
    s = g / (1.0 + tl.exp(-g))
    if BF16:
        s = _bf16_round(s)
    tl.store(s_ptr + offs, s, mask=mask)
    if WRITE_P:
        u = _dequantize_at(u_codes_ptr, u_scales_ptr, offs, mask, U_BITS, U_GROUP, BF16)
        if WRITE_U:
            tl.store(u_ptr + offs, u, mask=mask)
        p = s * u
        if BF16:
            p = _bf16_round(p)
        tl.store(p_ptr + offs, p, mask=mask)


def _grid(numel: int) -> tuple[int]:
    return (triton.cdiv(numel, BLOCK),)


def norm(
    codes: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    x_dtype: torch.dtype,
    stat: torch.Tensor,
    h_dtype: torch.dtype,
    weight: torch.Tensor | None,
    y_dtype: torch.dtype,
    want_x: bool,
    numel: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(h, y, x)`` of a stored RMSNorm input: ``h = h_dtype(x * stat[row])``, ``y = y_dtype(weight *
    h)`` when ``weight`` is given, ``x`` (dequantized, ``x_dtype``) when ``want_x``; rows of
    ``weight.numel()`` elements, flat, in the span's memory order."""
    hidden = numel // stat.numel()
    h = torch.empty(numel, dtype=h_dtype, device=codes.device)
    y = torch.empty(numel, dtype=y_dtype, device=codes.device) if weight is not None else h
    x = torch.empty(numel, dtype=x_dtype, device=codes.device) if want_x else h
    _norm_kernel[_grid(numel)](
        codes,
        scales,
        stat,
        weight if weight is not None else stat,
        h,
        y,
        x,
        numel,
        hidden,
        BITS=bits,
        GROUP=group_size,
        X_BF16=x_dtype == torch.bfloat16,
        H_BF16=h_dtype == torch.bfloat16,
        Y_BF16=y_dtype == torch.bfloat16,
        WRITE_Y=weight is not None,
        WRITE_X=want_x,
        BLOCK=BLOCK,
        **_launch_options(),
    )
    return h, (y if weight is not None else None), (x if want_x else None)


def gate(
    g_codes: torch.Tensor,
    g_scales: torch.Tensor,
    g_bits: int,
    g_group: int,
    u: tuple[torch.Tensor, torch.Tensor, int, int] | None,
    dtype: torch.dtype,
    want_g: bool,
    want_u: bool,
    numel: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(s, p, g, u)``: ``s = silu(g)`` and, given the up output's ``(codes, scales, bits, group)``,
    ``p = s * u``; ``g``/``u`` dequantized when wanted; all in ``dtype`` (the spans' type), flat."""
    s = torch.empty(numel, dtype=dtype, device=g_codes.device)
    p = torch.empty(numel, dtype=dtype, device=g_codes.device) if u is not None else s
    g_out = torch.empty(numel, dtype=dtype, device=g_codes.device) if want_g else s
    u_out = torch.empty(numel, dtype=dtype, device=g_codes.device) if want_u and u is not None else s
    u_codes, u_scales, u_bits, u_group = u if u is not None else (g_codes, g_scales, g_bits, g_group)
    _gate_kernel[_grid(numel)](
        g_codes,
        g_scales,
        u_codes,
        u_scales,
        s,
        p,
        g_out,
        u_out,
        numel,
        G_BITS=g_bits,
        G_GROUP=g_group,
        U_BITS=u_bits,
        U_GROUP=u_group,
        BF16=dtype == torch.bfloat16,
        WRITE_P=u is not None,
        WRITE_G=want_g,
        WRITE_U=want_u and u is not None,
        BLOCK=BLOCK,
        **_launch_options(),
    )
    return (
        s,
        p if u is not None else None,
        g_out if want_g else None,
        u_out if want_u and u is not None else None,
    )
