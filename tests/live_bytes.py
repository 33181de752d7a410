"""Live tensor bytes of a step on any device, without allocator statistics (CPUs have none).

    with LiveBytes(existing=parameter_storages(model)) as live:
        loss = model(input_ids=ids, labels=ids).loss
        after_forward = live.mark()          # bytes alive now; the peak restarts from here
        loss.backward()
    live.peaks  # [forward peak, backward peak]

Every storage an operator creates under the mode is counted once and dropped when it is freed (a
weak reference to the storage); storages that existed before (``existing``: the parameters) are not
counted when an operator returns a view of them.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def parameter_storages(model: nn.Module) -> set[int]:
    """Addresses of ``model``'s parameter storages (views of them are not new memory)."""
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under this mode and still alive, and their peaks."""

    def __init__(self, existing: Iterable[int] = ()) -> None:
        super().__init__()
        self.live = 0
        """Bytes alive now."""
        self.peak = 0
        """Largest ``live`` since the last ``mark`` (or the start)."""
        self.peaks: list[int] = []
        """The peak of each interval closed by ``mark`` or by leaving the mode."""
        self._seen = set(existing)
        self._refs: list[weakref.ref] = []

    def mark(self) -> int:
        """Close the current interval (its peak goes to ``peaks``); returns the bytes alive now."""
        self.peaks.append(self.peak)
        self.peak = self.live
        return self.live

    def __exit__(self, *exc: object) -> None:
        self.peaks.append(self.peak)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if key in self._seen or nbytes == 0:
                    continue
                self._seen.add(key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                self._refs.append(weakref.ref(storage, lambda _, key=key, n=nbytes: self._free(key, n)))
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)
