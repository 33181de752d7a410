"""Rebuild recomputed tensors with one kernel that also dequantizes their sources (on CUDA, via Triton).

The default policy keeps four kinds of saved tensors as recipes (``recipe.py``): an RMSNorm's
normalised value ``h = dt(x * rstd)`` and output ``y = w * h``, the SiLU output ``s = silu(g)`` and
the gating product ``p = s * u``. Unfused, backward dequantizes ``x``, ``g`` and ``u`` and runs each op
as its own kernel over full tensors. ``rebuild`` recognises those recipes and runs
``quant/triton_rebuild.py`` instead: the codes read once, ``h`` and ``y`` (or ``s`` and ``p``) written in
the same pass, and the dequantized sources written too while other readers still need them, so
every stored span stays dequantized exactly once per backward (``SavedTensor.reads``).

The unfused path stays the reference and the path everywhere else: CPU tensors, another recipe or
layout, a source already dequantized, asymmetric codes, a recipe under autocast. Under
``TRITON_INTERPRET=1`` the fused kernels also run on CPU tensors (the tests).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F

from .recipe import Recipe, Source

_T = torch.Tensor
_MUL = frozenset({_T.__mul__, _T.__rmul__, _T.mul, torch.mul})
_S0, _S1 = Source(0), Source(1)
_kernels: Any = None
"""``quant.triton_rebuild`` once loaded; ``False`` when Triton cannot run here."""


def _load_kernels(device: torch.device) -> Any:
    global _kernels
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return None
    if _kernels is None:
        try:
            from ..quant import triton_rebuild

            _kernels = triton_rebuild
        except Exception:  # no Triton: the unfused path
            _kernels = False
    return _kernels or None


def _is(value: Any, source: Source) -> bool:
    return isinstance(value, Source) and value == source


def match(recipe: Recipe) -> tuple | None:
    """Which fused kernel rebuilds ``recipe``: ``("norm_h", dtype)``, ``("norm_y", weight)``,
    ``("silu",)``, ``("gate",)`` (a product of two sources, one of them a SiLU), or ``None``."""
    if recipe.autocast:
        return None
    args, func = recipe.args, recipe.func
    if func is _T.to and len(args) == 2 and not recipe.kwargs and isinstance(args[1], torch.dtype):
        inner = args[0]
        if isinstance(inner, Recipe) and inner.func in _MUL and not inner.kwargs and not inner.autocast:
            if len(inner.args) == 2 and _is(inner.args[0], _S0) and _is(inner.args[1], _S1):
                return ("norm_h", args[1])
        return None
    if func is F.silu and len(args) == 1 and _is(args[0], _S0) and recipe.kwargs in ({}, {"inplace": False}):
        return ("silu",)
    if func in _MUL and len(args) == 2 and not recipe.kwargs:
        a, b = args
        if isinstance(a, torch.Tensor) and _is(b, _S0):
            return ("norm_y", a)
        if isinstance(b, torch.Tensor) and _is(a, _S0):
            return ("norm_y", b)
        if _is(a, _S0) and _is(b, _S1):
            return ("gate",)
    return None


def _contiguous(view: Any) -> bool:
    shape, stride = view.shape, view.stride
    expected, step = [], 1
    for size in reversed(shape):
        expected.append(step)
        step *= size
    return tuple(reversed(expected)) == tuple(stride)


def _codes_of(view: Any, numel: int) -> Any:
    """The stored holder behind ``view`` if its codes can be read directly: quantized symmetric, in
    its own contiguous order, not yet dequantized, ``numel`` elements read contiguously, and its
    engine's kernel choice allows Triton (``auto`` or ``triton``)."""
    holder = view.holder
    q = getattr(holder, "q", None)
    if q is None or holder.raw is not None or holder._dequantized is not None or q.zeros is not None:
        return None
    if holder.kernels is not None and holder.kernels.choice not in ("auto", "triton"):
        return None
    if holder.log_space or holder.perm is not None or not holder.dense or q.numel != numel:
        return None
    return holder if _contiguous(view) and math.prod(view.shape) == numel else None


def _read(holder: Any, value: torch.Tensor | None) -> None:
    """One read of a stored span happened in a fused kernel (``SavedTensor.unpack``'s bookkeeping):
    keep ``value`` (its dequantized tensor) for the reads still to come."""
    holder.reads -= 1
    holder._dequantized = value if holder.reads > 0 else None


_matches: dict[int, tuple[Recipe, tuple | None]] = {}
"""``match`` per recipe object (a plan's recipes are evaluated every step; the recipe is kept with its
answer so that its ``id`` cannot be reused)."""


def _match_cached(recipe: Recipe) -> tuple | None:
    entry = _matches.get(id(recipe))
    if entry is None or entry[0] is not recipe:
        if len(_matches) > 4096:
            _matches.clear()
        entry = _matches[id(recipe)] = (recipe, match(recipe))
    return entry[1]


_possible: bool | None = None
"""Whether a fused kernel can run in this process at all (a CUDA device, or Triton's interpreter)."""


def rebuild(derived: Any) -> torch.Tensor | None:
    """``derived``'s recomputed tensor from a fused kernel, or ``None`` (evaluate the recipe)."""
    global _possible
    if _possible is None:
        _possible = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if not _possible:  # a CPU run: no matching, no layout checks on the backward path
        return None
    found = _match_cached(derived.bound)
    if found is None:
        return None
    kind = found[0]
    if kind in ("norm_h", "silu"):
        return _norm(derived, None) if kind == "norm_h" else _gate(derived, None, -1)
    # The product's recomputed source: the norm's normalised value, or the SiLU output (either factor).
    index = 0 if kind == "norm_y" or getattr(derived.sources[0].holder, "derived", False) else 1
    producer = derived.sources[index].holder
    if not getattr(producer, "derived", False) or producer._result is not None:
        return None
    inner = match(producer.bound)
    if inner is None or inner[0] != ("norm_h" if kind == "norm_y" else "silu"):
        return None
    return _norm(producer, derived) if kind == "norm_y" else _gate(producer, derived, 1 - index)


def _norm(h_holder: Any, y_holder: Any | None) -> torch.Tensor | None:
    x_view, stat_view = h_holder.sources
    numel = math.prod(x_view.shape)
    x = _codes_of(x_view, numel)
    if x is None or stat_view.holder.raw is None or tuple(stat_view.shape) != (*x_view.shape[:-1], 1):
        return None
    kernels = _load_kernels(x.q.codes.device)
    if kernels is None:
        return None
    h_dtype = match(h_holder.bound)[1]
    weight = None if y_holder is None else match(y_holder.bound)[1]
    if weight is not None and (weight.numel() != x_view.shape[-1] or not weight.is_contiguous()):
        return None
    stat = stat_view.unpack().contiguous()
    y_dtype = torch.promote_types(weight.dtype, h_dtype) if weight is not None else h_dtype
    q = x.q
    h, y, x_flat = kernels.norm(
        q.codes, q.scales, q.bits, q.group_size, q.dtype, stat, h_dtype, weight, y_dtype, x.reads > 1, numel
    )
    _read(x, x_flat)
    shape = tuple(x_view.shape)
    h = h.view(shape)
    if y_holder is None:
        return h
    h_holder._result = h
    return y.view(shape)


def _gate(s_holder: Any, p_holder: Any | None, u_index: int) -> torch.Tensor | None:
    (g_view,) = s_holder.sources
    numel = math.prod(g_view.shape)
    g = _codes_of(g_view, numel)
    if g is None:
        return None
    u = None
    if p_holder is not None:
        u_view = p_holder.sources[u_index]
        u = _codes_of(u_view, numel)
        if u is None or tuple(u_view.shape) != tuple(g_view.shape) or u.q.dtype != g.q.dtype:
            return None
    kernels = _load_kernels(g.q.codes.device)
    if kernels is None:
        return None
    gq = g.q
    uq = None if u is None else (u.q.codes, u.q.scales, u.q.bits, u.q.group_size)
    s, p, g_flat, u_flat = kernels.gate(
        gq.codes, gq.scales, gq.bits, gq.group_size, uq, gq.dtype, g.reads > 1, u is not None and u.reads > 1, numel
    )
    _read(g, g_flat)
    shape = tuple(g_view.shape)
    if u is None:
        return s.view(shape)
    _read(u, u_flat)
    s_holder._result = s.view(shape)
    return p.view(shape)
