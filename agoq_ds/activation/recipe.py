"""Recipes: how backward rebuilds a saved tensor from other saved tensors instead of storing it.

A LLaMA block saves several tensors that are cheap elementwise functions of tensors it saves anyway:

* an RMSNorm saves its (fp32) input ``x`` and ``rsqrt(mean(x^2))`` for its own backward, and also
  the normalised value ``h = bf16(x * rstd)`` (for the weight's gradient); the next Linear layers
  save the norm's output ``y = weight * h``;
* the MLP saves the gate output ``g`` (for SiLU's backward) and the up output ``u`` (for the gating
  product's), and the down projection saves ``silu(g) * u``;
* the SiLU output itself, saved by the gating product.

Each of those is a ``Recipe`` over stored tensors: a tree of elementwise ops whose leaves are
``Source`` placeholders (stored holders of this forward), model parameters and plain constants.
Backward evaluates it on the dequantized sources, so it sees the same inputs the ops' own backward
sees, and the tensor costs 0 bytes. The stored sources can then be kept at 8 bits within the budget
a 4-bit store of every tensor would take (``classes.DEFAULT_CLASS_BITS``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .trace import ACTIVATIONS

T = torch.Tensor

ELEMENTWISE: frozenset[Callable] = frozenset(
    {
        T.__mul__,
        T.__rmul__,
        T.mul,
        torch.mul,
        T.__add__,
        T.__radd__,
        T.add,
        torch.add,
        T.__sub__,
        T.__rsub__,
        T.sub,
        torch.sub,
        T.__truediv__,
        T.div,
        torch.div,
        T.__neg__,
        T.neg,
        torch.neg,
        T.to,
        T.float,
        T.bfloat16,
        T.half,
        T.type_as,
        *ACTIVATIONS,
    }
    - {F.glu}
)
"""Ops a recipe may contain: elementwise (with broadcasting), cheap, deterministic given their inputs."""

MAX_DEPTH = 4
"""Deepest op tree a recipe may have (an RMSNorm's output is three ops deep)."""

MAX_SOURCES = 4
"""Most stored tensors one recipe may read."""


@dataclass(frozen=True, slots=True)
class Source:
    """Placeholder for the ``index``-th stored tensor a recipe reads."""

    index: int


@dataclass(frozen=True, slots=True)
class Recipe:
    """``func(*args, **kwargs)`` where arguments may be ``Source``s, nested ``Recipe``s, parameters or
    plain values."""

    func: Callable
    args: tuple
    kwargs: dict
    depth: int = 1
    """Ops on the longest path to a leaf."""
    autocast: tuple[tuple[str, torch.dtype], ...] = ()
    """(device type, dtype) of each autocast active when the op ran: backward runs it the same way
    (autocast computes e.g. ``softplus`` of fp16 input in fp32)."""
    partitioned: bool = False
    """Reads a ZeRO-3 parameter: evaluate ``bind_parameters(recipe)`` instead (see there)."""

    def __call__(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The recomputed tensor, given the tensors the ``Source``s stand for."""
        args = tuple(_resolve(a, inputs) for a in self.args)
        kwargs = {k: _resolve(v, inputs) for k, v in self.kwargs.items()}
        if not self.autocast:
            return self.func(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for device, dtype in self.autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype))
            return self.func(*args, **kwargs)


def autocast_state() -> tuple[tuple[str, torch.dtype], ...]:
    """The autocast contexts active now, as ``Recipe.autocast`` records them."""
    return tuple((d, torch.get_autocast_dtype(d)) for d in ("cuda", "cpu") if torch.is_autocast_enabled(d))


def _resolve(value: Any, inputs: Sequence[torch.Tensor]) -> Any:
    if isinstance(value, Source):
        return inputs[value.index]
    if isinstance(value, Recipe):
        return value(inputs)
    return value


def _shift(value: Any, offset: int) -> Any:
    if isinstance(value, Source):
        return Source(value.index + offset)
    if isinstance(value, Recipe):
        args = tuple(_shift(a, offset) for a in value.args)
        kwargs = {k: _shift(v, offset) for k, v in value.kwargs.items()}
        return Recipe(value.func, args, kwargs, value.depth, value.autocast)
    return value


def is_partitioned(p: torch.Tensor) -> bool:
    """Whether ``p`` is a ZeRO-3 parameter, whose data DeepSpeed may release between a forward and the
    backward that would read it."""
    return hasattr(p, "ds_id")


def bind_parameters(recipe: Recipe) -> Recipe | None:
    """``recipe`` with each ZeRO-3 parameter replaced by a copy of its current value (hidden-sized
    norm weights), taken in the forward while DeepSpeed has it gathered; ``None`` if one is not
    gathered now. Other parameters stay references: nothing changes them between a forward and its
    backward."""
    if not recipe.partitioned:
        return recipe
    try:
        return _bind(recipe)
    except _NotDerivable:
        return None


def _bind(value: Any) -> Any:
    if isinstance(value, Recipe):
        args = tuple(_bind(a) for a in value.args)
        kwargs = {k: _bind(v) for k, v in value.kwargs.items()}
        return Recipe(value.func, args, kwargs, value.depth, value.autocast)
    if isinstance(value, nn.Parameter) and is_partitioned(value):
        if value.numel() == 0 or value.numel() != getattr(value, "ds_numel", value.numel()):
            raise _NotDerivable  # released (DeepSpeed's first, tracing step releases every parameter)
        return value.detach().clone()
    return value


Leaf = tuple[Any, tuple[int, ...], tuple[int, ...]]
"""A stored source: (holder, shape, strides of the view read)."""

Lookup = Callable[[torch.Tensor], "tuple[Recipe, list[Leaf]] | Leaf | None"]
"""For a tensor argument: its stored holder (as a ``Leaf``), or the recipe of an unsaved tensor
computed earlier (with its leaves), or ``None`` when it is neither."""


def compose(
    func: Callable, args: tuple, kwargs: dict, out: torch.Tensor, lookup: Lookup
) -> tuple[Recipe, list[Leaf]] | None:
    """The recipe of ``out = func(*args, **kwargs)`` and its stored leaves, or ``None`` if ``out`` cannot
    be rebuilt from stored tensors (an argument is neither stored nor derivable nor a usable
    parameter, the op writes in place or returns a view, or the recipe would grow too large)."""
    if "out" in kwargs or kwargs.get("inplace"):
        return None
    leaves: list[Leaf] = []
    depth = 0
    partitioned = False

    def convert(value: Any) -> Any:
        nonlocal depth, partitioned
        if not isinstance(value, torch.Tensor):
            if isinstance(value, tuple | list) and any(isinstance(v, torch.Tensor) for v in value):
                raise _NotDerivable
            return value
        if value is out or value.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
            raise _NotDerivable  # in place, or a view: nothing new to rebuild
        if isinstance(value, nn.Parameter):
            partitioned = partitioned or is_partitioned(value)
            return value
        found = lookup(value)
        if found is None:
            raise _NotDerivable
        if isinstance(found[0], Recipe):
            recipe, sub_leaves = found
            depth = max(depth, recipe.depth)
            partitioned = partitioned or recipe.partitioned
            shifted = _shift(recipe, len(leaves))
            leaves.extend(sub_leaves)
            return shifted
        leaves.append(found)
        return Source(len(leaves) - 1)

    try:
        new_args = tuple(convert(a) for a in args)
        new_kwargs = {k: convert(v) for k, v in kwargs.items()}
    except _NotDerivable:
        return None
    if not leaves or len(leaves) > MAX_SOURCES or depth + 1 > MAX_DEPTH:
        return None
    return Recipe(func, new_args, new_kwargs, depth + 1, autocast_state(), partitioned), leaves


class _NotDerivable(Exception):
    pass
