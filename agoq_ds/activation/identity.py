"""The identity of saved data: one live storage number, and the keys built on it.

A pack hook sees many tensors that show the same memory (a transpose, the 2-D view a Linear saves of
its 3-D input, ZeRO-3's fresh alias of a module's input), and an address that a freed tensor gave
back can come again for a new one within the same forward. ``Storages`` numbers each storage while
it is alive: the same live storage keeps its number, a freed storage's address gets a new one. Every
identity the packer uses is built on that number:

* ``span_key``: the memory span a saved tensor shows (every view of a dense span matches), plus the
  in-place version, so data modified after saving is not confused with its old self. Deduplication
  of saved tensors, recipes over earlier spans, and a replayed view of an earlier span use it.
* ``view_key``: one view of the data (shape and strides too). Tracing (which module passed what to
  which) and attention-op attribution (which saved tensor is q, k, v) use it.

Nothing here keeps a tensor alive: a number holds a weak reference to its storage.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

SpanKey = tuple
"""(storage number, offset, elements, dtype, version), plus shape and strides for a tensor that is
not a permutation of a contiguous layout."""
ViewKey = tuple
"""(storage number, offset, shape, strides, dtype)."""


def dense_permutation(t: torch.Tensor) -> list[int] | None:
    """A permutation ``p`` with ``t.permute(p)`` contiguous (no copy), or ``None`` if there is none."""
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.shape[d]))
    return order if t.permute(order).is_contiguous() else None


class Storages:
    """Numbers the storages seen while they are alive (see module docstring)."""

    __slots__ = ("_count", "_entries")

    def __init__(self) -> None:
        self._entries: dict[int, tuple[int, StorageWeakRef]] = {}
        self._count = 0

    def number(self, t: torch.Tensor) -> int:
        """The number of ``t``'s storage: the same while that storage lives, never reused."""
        storage = t.untyped_storage()
        address = storage.data_ptr()
        entry = self._entries.get(address)
        if entry is None or entry[1].expired():
            self._count += 1
            entry = self._entries[address] = (self._count, StorageWeakRef(storage))
        return entry[0]

    def alive(self, number: int, t: torch.Tensor) -> bool:
        """Whether ``t`` shows the live storage numbered ``number``."""
        entry = self._entries.get(t.untyped_storage().data_ptr())
        return entry is not None and entry[0] == number and not entry[1].expired()

    def clear(self) -> None:
        """Forget the storages (end of a forward); numbers given later are new ones."""
        self._entries.clear()

    def span_key(self, t: torch.Tensor) -> SpanKey:
        """The memory span ``t`` shows (every view of a dense span has the same key)."""
        key = (self.number(t), t.storage_offset(), t.numel(), t.dtype, t._version)
        if not t.is_contiguous() and dense_permutation(t) is None:
            key += (tuple(t.shape), t.stride())
        return key

    def view_key(self, t: torch.Tensor) -> ViewKey:
        """The data one view of ``t`` shows (two live tensors with equal keys show the same elements)."""
        return (self.number(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


class SpanTable:
    """Span key -> the holder of that span, for one forward (weakly: the table keeps nothing alive)."""

    __slots__ = ("_holders",)

    def __init__(self) -> None:
        self._holders: weakref.WeakValueDictionary[SpanKey, Any] = weakref.WeakValueDictionary()

    def get(self, key: SpanKey) -> Any:
        """The live holder of ``key``, if any."""
        return self._holders.get(key)

    def put(self, key: SpanKey, holder: Any) -> None:
        """Remember ``holder`` for the span ``key``."""
        self._holders[key] = holder

    def clear(self) -> None:
        """Forget everything (end of a forward)."""
        self._holders.clear()
