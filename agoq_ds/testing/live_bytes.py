"""Live tensor bytes of a step on any device, without allocator statistics (CPUs have none).

    with LiveBytes(existing=parameter_storages(model)) as live:
        handles = set_gradients_aside(model, live)
        loss = model(input_ids=ids, labels=ids).loss
        after_forward = live.mark()          # bytes alive now; the peaks restart from here
        loss.backward()
    live.peaks       # [forward peak, backward peak]
    live.kept_peaks  # the same without the parameter gradients accumulated so far

    measure_step(model, ids)  # the above for one step of an HF causal LM

Every storage an operator creates under the mode is counted once and dropped when it is freed (a
weak reference to the storage); storages that existed before (``existing``: the parameters) are not
counted when an operator returns a view of them. ``set_gradients_aside(model, live)`` moves each
parameter gradient out of the count once autograd has accumulated it (``kept_peaks``: the peaks
without them, what a training framework holds in its own gradient buffers instead).
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
        self.aside = 0
        """Bytes of live storages set aside (``set_aside``)."""
        self.kept_peak = 0
        """Largest ``live - aside`` since the last ``mark``."""
        self.kept_peaks: list[int] = []
        """``kept_peak`` of each closed interval."""
        self._seen = set(existing)
        self._aside: set[int] = set()
        self._sizes: dict[int, int] = {}
        self._refs: list[weakref.ref] = []

    def mark(self) -> int:
        """Close the current interval (its peaks go to ``peaks`` and ``kept_peaks``); returns the bytes
        alive now."""
        self.peaks.append(self.peak)
        self.kept_peaks.append(self.kept_peak)
        self.peak = self.live
        self.kept_peak = self.live - self.aside
        return self.live

    def set_aside(self, t: torch.Tensor) -> None:
        """Stop counting ``t``'s storage in ``kept_peak`` (it stays in ``live`` and ``peak``)."""
        key = t.untyped_storage().data_ptr()
        if key in self._seen and key not in self._aside and key in self._sizes:
            self._aside.add(key)
            self.aside += self._sizes[key]

    def __exit__(self, *exc: object) -> None:
        self.peaks.append(self.peak)
        self.kept_peaks.append(self.kept_peak)
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
                self._sizes[key] = nbytes
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                self.kept_peak = max(self.kept_peak, self.live - self.aside)
                self._refs.append(weakref.ref(storage, lambda _, key=key, n=nbytes: self._free(key, n)))
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)
        self._sizes.pop(key, None)
        if key in self._aside:
            self._aside.discard(key)
            self.aside -= nbytes


def set_gradients_aside(model: nn.Module, live: LiveBytes) -> list:
    """Set each parameter's gradient aside in ``live`` once autograd has accumulated it; returns the
    hook handles (remove them when done)."""
    return [
        p.register_post_accumulate_grad_hook(lambda p: live.set_aside(p.grad))
        for p in model.parameters()
        if p.requires_grad
    ]


def measure_step(model: nn.Module, ids: torch.Tensor) -> dict:
    """One forward and backward of an HF causal LM on ``ids`` (gradients cleared first), counted:
    ``after_forward`` bytes, ``peaks`` and ``kept_peaks`` ([forward, backward], the latter with the
    parameter gradients set aside)."""
    model.zero_grad(set_to_none=True)
    with LiveBytes(parameter_storages(model)) as live:
        handles = set_gradients_aside(model, live)
        loss = model(input_ids=ids, labels=ids).loss
        after_forward = live.mark()
        loss.backward()
    for handle in handles:
        handle.remove()
    return {"after_forward": after_forward, "peaks": live.peaks, "kept_peaks": live.kept_peaks}
