"""Exact byte accounting that works the same for a stock DeepSpeed run and an agoq run.

* ``CollectiveMeter`` counts the bytes each rank hands to ``deepspeed.comm`` collectives and the
  bytes it puts on the wire under the standard ring/pairwise algorithms (all-reduce
  ``2(n-1)/n * size``, all-to-all and point-to-point sends the bytes leaving the rank, all-gather ``(n-1) * input``,
  reduce-scatter/reduce ``(n-1)/n * size``).
* ``SavedActivationMeter`` counts the bytes autograd saves for backward (parameters and buffers
  excluded, a tensor saved twice counted once) without changing them: the baseline that agoq's
  stored bytes are compared with.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from contextlib import ContextDecorator
from dataclasses import dataclass, field
from typing import Any

import torch


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _wire_bytes(op: str, world: int, rank: int, a: dict[str, Any]) -> tuple[int, int]:
    """(bytes handed to the collective, bytes this rank sends) for one call of ``op``.

    ``a`` holds the call's arguments by name (``deepspeed.comm``'s signatures).
    """
    if world <= 1:
        return 0, 0
    if op == "batch_isend_irecv":  # point-to-point: the sends leave the rank
        sent = sum(_nbytes(o.tensor) for o in a["p2p_op_list"] if o.op == "isend")
        return sent, sent
    if op == "reduce_scatter":  # the list form (gloo has no reduce_scatter_tensor): one chunk per rank
        size = sum(_nbytes(t) for t in a["input_list"])
        return size, size * (world - 1) // world
    if op == "all_gather":  # the list form
        size = _nbytes(a["tensor"])
        return size, size * (world - 1)
    size = _nbytes(a["tensor"])
    if op == "all_to_all_single":
        splits = a.get("input_split_sizes")
        rows = a["tensor"].shape[0] if a["tensor"].dim() else 1
        own = size * splits[rank] // max(rows, 1) if splits else size // world
        return size, size - own
    if op in ("all_gather_into_tensor", "allgather_fn"):
        return size, size * (world - 1)
    if op == "all_reduce":
        return size, 2 * size * (world - 1) // world
    return size, size * (world - 1) // world  # reduce, reduce_scatter_tensor, broadcast


_POSITIONAL = {
    "all_reduce": ("tensor", "op", "group"),
    "reduce": ("tensor", "dst", "op", "group"),
    "all_to_all_single": ("output", "tensor", "output_split_sizes", "input_split_sizes", "group"),
    "all_gather_into_tensor": ("output_tensor", "tensor", "group"),
    "reduce_scatter_tensor": ("output_tensor", "tensor", "op", "group"),
    "reduce_scatter": ("output", "input_list", "op", "group"),
    "reduce_scatter_fn": ("output_tensor", "tensor", "op", "group"),
    "allgather_fn": ("output_tensor", "tensor", "group"),
    "all_gather": ("tensor_list", "tensor", "group"),
    "broadcast": ("tensor", "src", "group"),
    "batch_isend_irecv": ("p2p_op_list",),
}
"""Leading positional parameters of the metered ``deepspeed.comm`` functions (0.19.8 signatures;
DeepSpeed's ``timed_op`` wrapper hides them from ``inspect``)."""

METERED_OPS = tuple(_POSITIONAL)
"""``deepspeed.comm`` functions the meter wraps."""


@dataclass
class CollectiveMeter(ContextDecorator):
    """Counts bytes per ``deepspeed.comm`` op while active (``with CollectiveMeter() as m:``)."""

    handed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Bytes of the tensors handed to each op."""
    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Bytes this rank puts on the wire per op (algorithm model in the module docstring)."""
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Number of calls per op."""
    _saved: dict[str, Any] = field(default_factory=dict)

    def __enter__(self) -> CollectiveMeter:
        import deepspeed.comm as dist

        for op in METERED_OPS:
            original = getattr(dist, op)
            self._saved[op] = original
            setattr(dist, op, self._wrap(op, original))
        return self

    def __exit__(self, *exc: object) -> None:
        import deepspeed.comm as dist

        for op, original in self._saved.items():
            setattr(dist, op, original)
        self._saved.clear()

    def _wrap(self, op: str, original: Any) -> Any:
        names = _POSITIONAL[op]

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            import deepspeed.comm as dist

            named = {**dict(zip(names, args, strict=False)), **kwargs}
            if "input_tensor" in named:  # allgather_fn's keyword spelling
                named["tensor"] = named.pop("input_tensor")
            group = named.get("group")
            handed, sent = _wire_bytes(op, dist.get_world_size(group), dist.get_rank(group), named)
            self.handed[op] += handed
            self.sent[op] += sent
            self.calls[op] += 1
            return original(*args, **kwargs)

        return counted

    def total_sent(self, ops: tuple[str, ...] | None = None) -> int:
        """Bytes sent over all (or the given) ops."""
        return sum(v for k, v in self.sent.items() if ops is None or k in ops)

    def reset(self) -> None:
        """Zero all counters."""
        self.handed.clear()
        self.sent.clear()
        self.calls.clear()


class SavedActivationMeter:
    """Counts the bytes autograd saves for backward, leaving the tensors untouched.

    Use around a forward pass: ``with SavedActivationMeter(model) as m: loss = model(x)``; then
    ``m.bytes`` holds the saved bytes of that forward (parameters/buffers excluded, each storage
    counted once).
    """

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        self._skip = {p.data_ptr() for p in model.parameters()} if model is not None else set()
        if model is not None:
            self._skip |= {b.data_ptr() for b in model.buffers()}
        self._seen: set[tuple[int, int, tuple[int, ...]]] = set()
        self.bytes = 0
        """Saved bytes counted so far."""
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.nn.Parameter) or t.data_ptr() in self._skip:
            return t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += _nbytes(t)
        return t

    def __enter__(self) -> SavedActivationMeter:
        self._seen.clear()
        self.bytes = 0
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def gradient_buffer_bytes(optimizer: Any) -> int:
    """Bytes of gradient accumulation storage the optimizer holds between backward and ``step()``.

    agoq's optimizer reports its own int8 buffers (+ scales, + error-feedback residuals); for DeepSpeed's
    stock ZeRO-1/2 optimizer this is the owned-partition accumulator (``averaged_gradients``,
    stage 2) or the full ``param.grad`` tensors (stage 1 and no ZeRO), and with optimizer offload its
    fp32 host gradient partition, each storage counted once.
    """
    agoq_stats = getattr(optimizer, "agoq_stats", None)
    if callable(agoq_stats):
        return int(agoq_stats().get("state_bytes", 0))
    tensors: list[torch.Tensor] = []
    for group in getattr(optimizer, "averaged_gradients", {}).values():
        tensors += [t for t in group or () if t is not None]  # None between steps with offload
    if getattr(optimizer, "cpu_offload", False):  # ZeRO-Offload: the fp32 gradient partition on the host
        tensors += [p.grad for p in optimizer.single_partition_of_fp32_groups if p.grad is not None]
    if not tensors:
        groups = getattr(optimizer, "bit16_groups", None) or [g["params"] for g in optimizer.param_groups]
        tensors = [p.grad for g in groups for p in g if p.grad is not None]
    seen: set[int] = set()
    total = 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
