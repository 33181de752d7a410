"""Pure-torch reference of the blockwise quantizer (see ``format.py`` for the exact contract).

Runs on any device. It is the definition the compiled and Triton kernels are tested against, and the
fallback when no compiled backend can be loaded.
"""

from __future__ import annotations

import torch

from .format import TINY, levels, num_groups, packed_bytes, qmax


def _grouped_fp32(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """Flatten ``x`` to fp32 and zero-pad to whole groups: returns ``(groups [G, group_size], numel)``."""
    flat = x.reshape(-1).float()
    numel = flat.numel()
    pad = num_groups(numel, group_size) * group_size - numel
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, group_size), numel


def _pad_edge(groups: torch.Tensor, numel: int) -> torch.Tensor:
    """Replace the padding of the last group by its first element, so min/max ignore the padding."""
    pad = groups.numel() - numel
    if pad and numel:
        last = groups[-1]
        last[-pad:] = last[0]
    return groups


def _round(v: torch.Tensor, stochastic: bool, seed: int) -> torch.Tensor:
    if not stochastic:
        return torch.round(v)
    gen = torch.Generator(device=v.device).manual_seed(seed)
    noise = torch.rand(v.shape, generator=gen, device=v.device, dtype=torch.float32)
    return torch.floor(v + noise)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (< 2**bits, any integer dtype, 1-D) ``8 // bits`` per byte, little end first."""
    per_byte = 8 // bits
    codes = codes.to(torch.uint8)
    pad = packed_bytes(codes.numel(), bits) * per_byte - codes.numel()
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    codes = codes.view(-1, per_byte)
    out = torch.zeros(codes.shape[0], dtype=torch.uint8, device=codes.device)
    for i in range(per_byte):
        out |= codes[:, i] << (i * bits)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: returns ``numel`` uint8 codes."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (i * bits)) & mask for i in range(per_byte)]
    return torch.stack(parts, dim=1).reshape(-1)[:numel]


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    stochastic: bool,
    seed: int,
    scale_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize ``x``; returns ``(codes, scales, zeros)`` as described in ``format.py``."""
    groups, numel = _grouped_fp32(x, group_size)
    if symmetric:
        absmax = groups.abs().amax(dim=1)
        nonfinite = ~torch.isfinite(absmax)
        flushed = absmax < TINY
        scale = (absmax / qmax(bits)).to(scale_dtype).float()
        scale = torch.where(flushed, torch.zeros_like(scale), scale)
        inv = torch.where(flushed | nonfinite, torch.zeros_like(scale), 1.0 / scale)
        q = _round(groups * inv[:, None], stochastic, seed).clamp_(-qmax(bits), qmax(bits))
        q = torch.where(nonfinite[:, None], torch.zeros_like(q), q)
        scale = torch.where(nonfinite, torch.full_like(scale, float("nan")), scale)
        q = q.reshape(-1)[:numel]
        codes = q.to(torch.int8) if bits == 8 else pack_codes((q + 2 ** (bits - 1)).to(torch.uint8), bits)
        return codes, scale.to(scale_dtype), None

    edged = _pad_edge(groups.clone(), numel)
    mn = edged.amin(dim=1)
    mx = edged.amax(dim=1)
    nonfinite = ~(torch.isfinite(mn) & torch.isfinite(mx))
    span = mx - mn
    nonfinite |= ~torch.isfinite(span)
    flushed = span < TINY
    scale = span / levels(bits)
    inv = torch.where(flushed | nonfinite, torch.zeros_like(scale), 1.0 / scale)
    scale = torch.where(flushed, torch.zeros_like(scale), scale)
    q = _round((groups - mn[:, None]) * inv[:, None], stochastic, seed).clamp_(0, levels(bits))
    q = torch.where(nonfinite[:, None], torch.zeros_like(q), q)
    nan = torch.full_like(scale, float("nan"))
    scale = torch.where(nonfinite, nan, scale)
    mn = torch.where(nonfinite, nan, mn)
    flat = q.reshape(-1)[:numel].to(torch.uint8)
    codes = pack_codes(flat, bits) if bits < 8 else flat
    return codes, scale, mn


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
    if bits == 8:
        q = codes.float() if codes.dtype == torch.int8 else codes.to(torch.uint8).float()
    else:
        q = unpack_codes(codes, bits, numel).float()
        if zeros is None:
            q = q - 2 ** (bits - 1)
    ngroups = num_groups(numel, group_size)
    pad = ngroups * group_size - numel
    if pad:
        q = torch.nn.functional.pad(q, (0, pad))
    q = q.view(ngroups, group_size)
    x = q * scales.float()[:, None]
    if zeros is not None:
        x = x + zeros.float()[:, None]
    return x.reshape(-1)[:numel].to(out_dtype)
