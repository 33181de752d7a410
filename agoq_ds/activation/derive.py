"""Which saved tensors of a forward can be rebuilt from stored ones: derivations, kept as recipes.

The op watcher reports every elementwise op (``recipe.ELEMENTWISE``) of a recorded forward. When its
inputs are spans stored in this forward (or tensors derivable in turn) and parameters, the output's
derivation is remembered under the output's span key; a later save of that output becomes a
``DerivedTensor`` (0 bytes) evaluated from the stored sources in backward (``recipe.py`` says which
ops: activation outputs, an RMSNorm's normalised value and output, the MLP's gating product).

Sources are held weakly: a derivation whose source holder was freed is dropped, and the output's
span key carries its storage's liveness (``identity.Storages``), so a freed output's address reused
by a new tensor never matches.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from .identity import SpanKey, SpanTable, Storages
from .recipe import ELEMENTWISE, Leaf, Recipe, bind_parameters, compose
from .storage import DerivedTensor, Ledger, SavedView


def _live_leaves(refs: tuple) -> list[Leaf] | None:
    """The (holder, shape, strides) of a recipe's sources, or ``None`` if one was freed."""
    leaves: list[Leaf] = []
    for ref, shape, stride in refs:
        holder = ref()
        if holder is None:
            return None
        leaves.append((holder, shape, stride))
    return leaves


class Derivations:
    """The derivations of the current forward (see module docstring)."""

    ops: frozenset[Callable] = ELEMENTWISE
    """The ops the op watcher reports to ``on_elementwise``."""

    def __init__(self, storages: Storages, ledger: Ledger) -> None:
        self.storages, self.ledger = storages, ledger
        self._table: dict[SpanKey, tuple[Recipe, tuple, Recipe]] = {}

    def clear(self) -> None:
        """Forget every derivation (the forward ended)."""
        self._table.clear()

    def on_elementwise(self, func: Callable, args: tuple, kwargs: dict, out: Any, spans: SpanTable) -> None:
        """Remember how ``out = func(*args, **kwargs)`` can be rebuilt from the stored ``spans``."""
        if not isinstance(out, torch.Tensor) or out.layout != torch.strided or not out.is_floating_point():
            return
        composed = compose(func, args, kwargs, out, lambda t: self._derivation_of(t, spans))
        if composed is None:
            return
        recipe, leaves = composed
        bound = bind_parameters(recipe)  # ZeRO-3 parameters: copied now, while they are gathered
        if bound is None:
            return
        refs = tuple((weakref.ref(holder), shape, stride) for holder, shape, stride in leaves)
        self._table[self.storages.span_key(out)] = (recipe, refs, bound)

    def _derivation_of(self, t: torch.Tensor, spans: SpanTable) -> tuple[Recipe, list[Leaf]] | Leaf | None:
        """``t``'s holder in this forward, or the recipe of ``t`` if it was not saved but can be rebuilt."""
        key = self.storages.span_key(t)
        holder = spans.get(key)
        if holder is not None:
            return holder, tuple(t.shape), t.stride()
        entry = self._table.get(key)
        if entry is None:
            return None
        leaves = _live_leaves(entry[1])
        return (entry[0], leaves) if leaves is not None else None

    def derive(self, key: SpanKey, t: torch.Tensor) -> DerivedTensor | None:
        """A ``DerivedTensor`` for the saved ``t`` (span ``key``) if it can be rebuilt, else ``None``."""
        entry = self._table.get(key)
        if entry is None:
            return None
        recipe, refs, bound = entry
        sources = _live_leaves(refs)
        if sources is None:
            return None
        return DerivedTensor(tuple(SavedView(*leaf) for leaf in sources), recipe, t, self.ledger, bound)
