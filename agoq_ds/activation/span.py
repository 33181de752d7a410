"""How one saved span is stored, as a record: the plan types of a forward and the decision of one span.

A span is one saved memory region (every view of a dense tensor shares it). ``SpanPlan`` says how it
is stored (class, module, bits, memory order, log space, or recomputed by a recipe); a ``Step`` says
what the i-th saved tensor of a forward became (kept as it is, a new span, a view of an earlier
span); a ``ForwardPlan`` is all of a forward's steps and spans plus what they count in the ledger.
``span_of`` reads the record back off a final holder (``storage.py``) so a recorded forward can be
replayed (``plan.py``).

This module is the floor of ``activation/``'s packing: it imports nothing of agoq's but the ground
floor's layer classes, and
``storage.py`` (the holders) and ``plan.py`` (recording and replay) build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..layer_classes import LOSS_HEAD_MIN_BITS

if TYPE_CHECKING:
    from .recipe import Recipe

KEEP, NEW, ALIAS = 0, 1, 2
"""Step kinds: the tensor is returned as it is (a parameter, a foreign layout), starts a span, or is
a view of a span started earlier in the forward."""


@dataclass
class Usage:
    """Counts for one bucket (a class, a module, a forward)."""

    tensors: int = 0
    """Saved tensors (after deduplication)."""
    numel: int = 0
    """Elements."""
    stored: int = 0
    """Bytes actually held (codes + scales for quantized tensors)."""
    baseline: int = 0
    """Bytes the unquantized tensors would have held."""
    quantized_numel: int = 0
    """Elements stored quantized."""
    derived_numel: int = 0
    """Elements recomputed in backward from another stored tensor (0 bytes, ``DerivedTensor``)."""

    def add(
        self, numel: int, stored: int, baseline: int, quantized: bool, tensors: int = 1, derived: bool = False
    ) -> None:
        """Add one tensor (or, with negative numbers, take one back)."""
        self.tensors += tensors
        self.numel += numel
        self.stored += stored
        self.baseline += baseline
        self.quantized_numel += numel if quantized else 0
        self.derived_numel += numel if derived else 0

    def merge(self, other: Usage, times: int = 1) -> None:
        """Add all of ``other``, ``times`` times."""
        self.tensors += times * other.tensors
        self.numel += times * other.numel
        self.stored += times * other.stored
        self.baseline += times * other.baseline
        self.quantized_numel += times * other.quantized_numel
        self.derived_numel += times * other.derived_numel

    @property
    def avg_bits(self) -> float:
        """Stored bits per element, scales included."""
        return 8.0 * self.stored / self.numel if self.numel else 0.0


@dataclass(frozen=True, slots=True)
class Step:
    """The i-th saved tensor of a planned forward."""

    kind: int
    """``KEEP``, ``NEW`` or ``ALIAS``."""
    shape: tuple[int, ...]
    """Shape of the saved tensor (checked on replay)."""
    stride: tuple[int, ...]
    """Strides of the saved tensor (checked on replay)."""
    dtype: torch.dtype
    """Type of the saved tensor (checked on replay)."""
    span: int = -1
    """Index of its span in ``ForwardPlan.spans`` (``NEW``/``ALIAS``)."""


@dataclass(slots=True)
class SpanPlan:
    """How one span is stored."""

    cls: str
    """Layer class it is counted under."""
    module: str
    """Name of the module it is counted under."""
    numel: int
    """Elements."""
    baseline: int
    """Bytes unquantized."""
    stored: int
    """Bytes held (0 for a recomputed span)."""
    bits: int = 16
    """Stored bit-width (16: kept as it is)."""
    perm: tuple[int, ...] | None = None
    """Permutation to memory order, ``None`` for an identity or a non-dense tensor."""
    dense: bool = True
    """A permutation of a contiguous layout (views of it share the span)."""
    quantizable: bool = False
    """Whether the tensor could be quantized at all (kept for ``SavedTensor``'s bookkeeping)."""
    log_space: bool = False
    """Log-probabilities stored as probabilities."""
    aliased: bool = False
    """A later step is a view of this span: replay remembers its storage to check that."""
    derived_from: tuple[int, ...] = ()
    """For a recomputed span (``DerivedTensor``): indices of the spans it is computed from."""
    source_views: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = ()
    """Shape and strides of the view of each source span the recipe reads."""
    recipe: Recipe | None = None
    """The recomputation."""


@dataclass
class ForwardPlan:
    """What every saved tensor of one forward became, and what the forward counts in the ledger."""

    steps: tuple[Step, ...]
    """One per saved tensor, in save order."""
    spans: tuple[SpanPlan, ...]
    """One per span, in creation order (which is also the order of their rounding seeds)."""
    by_class: dict[str, Usage] = field(default_factory=dict)
    """Usage per class of one replayed forward."""
    by_module: dict[tuple[str, str], Usage] = field(default_factory=dict)
    """Usage per (module, class) of one replayed forward."""
    total: Usage = field(default_factory=Usage)
    """Usage of one replayed forward."""
    kept: frozenset[int] = frozenset()
    """``id`` of every parameter and buffer of the model when it was recorded (never stored)."""


def span_of(holder: Any, index: dict[int, int]) -> SpanPlan | None:
    """The ``SpanPlan`` of a holder (``storage.SavedTensor`` or ``storage.DerivedTensor``) as it was
    stored, with ``index`` (``id`` of each earlier holder -> its span index) naming a recomputed
    span's sources; ``None`` if it cannot be replayed (not final, kept for NaN/Inf, a source outside
    the plan)."""
    if not holder.final:
        return None
    if holder.derived:
        sources = tuple(index.get(id(view.holder), -1) for view in holder.sources)
        if -1 in sources:
            return None
        return SpanPlan(
            holder.cls,
            holder.module,
            holder.numel,
            holder.baseline,
            0,
            derived_from=sources,
            source_views=tuple((view.shape, view.stride) for view in holder.sources),
            recipe=holder.recipe,
        )
    if holder.nonfinite:
        return None
    quantized = holder.q is not None
    return SpanPlan(
        holder.cls,
        holder.module,
        holder.numel,
        holder.baseline,
        holder.stored,
        bits=holder.bits if quantized else 16,
        perm=None if holder.perm is None or holder.perm == tuple(range(len(holder.perm))) else holder.perm,
        dense=holder.dense,
        quantizable=holder.quantizable,
        log_space=holder.log_space,
    )


def decide(
    cls: str,
    module: str,
    numel: int,
    baseline: int,
    requested: list[int],
    *,
    perm: tuple[int, ...] | None,
    dense: bool,
    quantizable: bool,
    log_space: bool,
) -> SpanPlan:
    """How a recorded span is stored once its class and module are known and its savers asked for
    ``requested`` bit-widths. The bit-width is the largest asked for (a span saved by several ops, or
    as several views, is stored once, at the finest width any of them wants), at least
    ``LOSS_HEAD_MIN_BITS`` for log-probabilities stored as probabilities (the loss head's softmax
    backward reads them directly). The span is quantized at that width if it may be quantized at all
    (``quantizable``) and the width is below 16, kept as it is otherwise. ``stored`` is the baseline:
    the quantized size is known once ``SavedTensor.store`` has quantized it."""
    bits = max(requested)
    if log_space and bits < 16:
        bits = max(bits, LOSS_HEAD_MIN_BITS)
    return SpanPlan(
        cls,
        module,
        numel,
        baseline,
        baseline,
        bits=bits if quantizable and bits < 16 else 16,
        perm=None if perm is None or perm == tuple(range(len(perm))) else perm,
        dense=dense,
        quantizable=quantizable,
        log_space=log_space,
    )
