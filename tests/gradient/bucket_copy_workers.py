"""Workers of ``test_bucket_copy``: the largest tensor allocated while a real DeepSpeed ZeRO-2 engine
reduces its gradient buckets through the 8-bit path."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tests.gradient import grad_workers as w

BUCKET = 2_000
"""``reduce_bucket_size``: each bucket holds several of the MLP's parameters."""
GROUP = 128


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 30))


def _train(engine, rank: int, steps: int) -> None:
    """``steps`` optimizer steps of ``_mlp`` on this rank's random batches."""
    gen = torch.Generator().manual_seed(1 + rank)
    for _ in range(steps):
        x, y = torch.randn(4, 24, generator=gen), torch.randn(4, 30, generator=gen)
        loss = ((engine(x) - y) ** 2).mean()
        engine.backward(loss)
        engine.step()


class _LargestNew(TorchDispatchMode):
    """Records the tensors aten ops create (outputs that alias no input); ``largest_temporary`` is
    the numel of the largest one no longer alive (what the int8 store keeps, its codes and scales,
    is not a temporary)."""

    def __init__(self) -> None:
        super().__init__()
        self.created: list[tuple[int, str, Any]] = []

    def largest_temporary(self) -> tuple[int, str]:
        gone = [(n, op) for n, op, ref in self.created if ref() is None]
        return max(gone, default=(0, ""))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.created.append((t.numel(), str(func), weakref.ref(t)))
        return out


def reduce_largest_temporary(rank: int, world: int, span_chunk: int | None) -> dict[str, Any]:
    """Three ZeRO-2 steps; per bucket reduction the largest new tensor, the bucket sizes, the params."""
    from agoq_ds.deepspeed.layout import bucket_layout
    from agoq_ds.gradient import accumulator

    if span_chunk is not None:
        accumulator.SPAN_CHUNK = span_chunk
    config = w.ds_config(2, micro=4, reduce_bucket_size=BUCKET)
    engine = w.make_engine(_mlp(), config, {"gradient": {"group_size": GROUP}})
    opt = engine.optimizer
    record = {"largest": 0, "op": "", "bucket": 0, "buckets": 0, "slices": 0}
    inner = opt._agoq_reduce

    def measured(flat, dtype, stock):
        bucket = opt.ipg_buckets[dtype]
        layout_slices = len(bucket.params)
        layout = bucket_layout(opt, bucket.params, world, rank)
        share = max(sum(n for _, n in slices) for slices in layout.owner_map)
        record["share"] = max(record.get("share", 0), share)
        with _LargestNew() as mode:
            inner(flat, dtype, stock)
        gc.collect()
        largest, op = mode.largest_temporary()
        if largest > record["largest"]:
            record["largest"], record["op"] = largest, op
        record["bucket"] = max(record["bucket"], flat.numel())
        record["buckets"] += 1
        record["slices"] = max(record["slices"], layout_slices)

    opt._agoq_reduce = measured
    _train(engine, rank, 3)
    record["params"] = [p.detach().float().numpy().tobytes() for p in engine.module.parameters()]
    return record


def reduction_temporaries(rank: int, world: int, round_elements: int | None) -> list[dict[str, int]]:
    """Two ZeRO-2 steps; per bucket reduction the live bytes it allocated at its peak beyond what it
    leaves behind (the partition accumulator's first allocation), and the planner's figure for it
    (``planner.reduction_working_set``, computed here, where the round and chunk sizes are set)."""
    from agoq_ds.config import parse_agoq_config
    from agoq_ds.deepspeed.layout import bucket_layout
    from agoq_ds.gradient import accumulator, collectives
    from agoq_ds.planner import reduction_working_set
    from agoq_ds.testing.live_bytes import LiveBytes

    if round_elements is not None:
        collectives.ROUND_ELEMENTS = accumulator.SPAN_CHUNK = round_elements
    block = {"gradient": {"group_size": GROUP}}
    engine = w.make_engine(_mlp(), w.ds_config(2, micro=4, reduce_bucket_size=BUCKET), block)
    opt = engine.optimizer
    inner = opt._agoq_reduce
    rows: list[dict[str, int]] = []

    def measured(flat, dtype, stock):
        layout = bucket_layout(opt, opt.ipg_buckets[dtype].params, world, rank)
        share = sum(n for _, n in layout.owner_map[rank])
        with LiveBytes() as live:
            inner(flat, dtype, stock)
        planned = reduction_working_set(flat.numel(), share, world, parse_agoq_config(block))
        rows.append(
            {"bucket": flat.numel(), "share": share, "temporaries": live.peaks[-1] - live.live, "planned": planned}
        )

    opt._agoq_reduce = measured
    _train(engine, rank, 2)
    return rows


def partition_after_reduction(rank: int, world: int, round_elements: int | None, stage: int = 2) -> list[float]:
    """One ZeRO-2 (or 3) micro-batch, round to nearest: this rank's int8 gradient partition,
    dequantized, after the boundary reduction (exchanged and stored in rounds of ``round_elements``, or
    in one)."""
    from agoq_ds.gradient import collectives

    if round_elements is not None:
        collectives.ROUND_ELEMENTS = round_elements
    block = {"gradient": {"group_size": GROUP, "rounding": "nearest"}}
    zero = {"stage3_param_persistence_threshold": 0} if stage == 3 else {}
    engine = w.make_engine(_mlp(), w.ds_config(stage, micro=4, reduce_bucket_size=BUCKET, **zero), block)
    gen = torch.Generator().manual_seed(1 + rank)
    x, y = torch.randn(4, 24, generator=gen), torch.randn(4, 30, generator=gen)
    engine.backward(((engine(x) - y) ** 2).mean())
    opt = engine.optimizer
    partition = opt._agoq_partition if stage == 3 else opt.agoq_store.step_accumulator(0)
    return partition.dequantize().tolist()
