"""Count the operations that make a GPU program wait for the device (host synchronisations).

    with HostSyncCounter() as syncs:
        loss = engine(batch).loss; engine.backward(loss); engine.step()
    syncs.total, syncs.by_op, syncs.where

On a CUDA device each of these copies a device value to the host and blocks until the GPU has caught
up: ``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``, ``if t:``),
``aten.is_nonzero``, ``aten.equal``, ``aten.nonzero`` / ``masked_select`` (data-dependent output size).
On a CPU they cost nothing, but they are the same Python calls, so counting them on a CPU predicts the
synchronisations of a GPU step. ``where`` keeps the innermost project frame of each, for the message.
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
}
"""Operators whose result size or value the host must read from the device."""

_ROOT = str(Path(__file__).resolve().parents[2])


class HostSyncCounter(TorchDispatchMode):
    """A dispatch mode that counts ``SYNC_OPS`` (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self.where: Counter[str] = Counter()

    @property
    def total(self) -> int:
        """Synchronisations counted."""
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            self.by_op[str(func.overloadpacket.__name__)] += 1
            self.where[_caller()] += 1
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    """``file:line function`` of the innermost frame outside torch (the code that asked)."""
    frames = [f for f in traceback.extract_stack()[:-3] if "/torch/" not in f.filename]
    if not frames:
        return "?"
    f = frames[-1]
    return f"{f.filename.replace(_ROOT + '/', '')}:{f.lineno} {f.name}"
