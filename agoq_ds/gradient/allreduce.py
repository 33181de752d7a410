"""The data-parallel gradient all-reduce of the paths without ZeRO gradient partitioning (ZeRO stage 0
and DeepSpeed's ``BF16_Optimizer``), one chunk at a time.

DeepSpeed reduces these gradients in ``engine.allreduce_bucket``: a ring all-reduce of each flat
bucket in the communication dtype, scaled by ``1 / dp`` when gradients are averaged. Here every chunk
goes through ``all_reduce_8bit`` (8-bit reduce-scatter with fp32 sums, then an int8 all-gather; the
result is bit-identical on every rank) or, with ``communication_bits: 32``, through DeepSpeed's kind
of all-reduce in ``comm_dtype``. The caller supplies ``read(start, end)`` (the chunk's local values)
and ``write(start, end, reduced)``, so a large int8 accumulator is never dequantized in one piece:
chunks of ``CHUNK_ELEMENTS`` bound the fp32 transient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import GradientConfig
from ..quant import Kernels
from .collectives import CommCounter, all_reduce_8bit, reduction_args
from .comm import deepspeed_comm

dist = deepspeed_comm(globals())
"""``deepspeed.comm``, imported on first use (``comm.py``)."""

CHUNK_ELEMENTS = 1 << 24
"""Elements per all-reduce call (64 MiB of fp32 transient per chunk)."""


def chunk_bounds(numel: int, chunk: int, align: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges covering ``numel`` elements; every start is a multiple of ``align``."""
    step = max(align, chunk // align * align)
    return [(start, min(start + step, numel)) for start in range(0, numel, step)]


def all_reduce_chunked(
    numel: int,
    read: Callable[[int, int], torch.Tensor],
    write: Callable[[int, int, torch.Tensor], None],
    *,
    config: GradientConfig,
    group,
    scale: float,
    seed: Callable[[int], int],
    comm_dtype: torch.dtype,
    counter: CommCounter,
    chunk: int = CHUNK_ELEMENTS,
    kernels: Kernels | None = None,
) -> None:
    """All-reduce a flat gradient of ``numel`` elements over ``group``, chunk by chunk.

    ``read(a, b)`` returns the local values of ``[a, b)`` (1-D, any float dtype); ``write(a, b, t)``
    receives ``scale * sum over ranks`` (fp32 for 8-bit communication, ``comm_dtype`` otherwise).
    ``seed(a)`` gives the stochastic-rounding seed of the chunk starting at ``a``; ``kernels`` is the
    engine's kernel choice (``store.kernels``). Every rank must call this with the same ``numel`` and
    ``chunk``.
    """
    world = dist.get_world_size(group=group)
    for start, end in chunk_bounds(numel, chunk, config.group_size):
        values = read(start, end)
        counter.add_baseline(end - start, world)
        if config.communication_bits == 8:
            args = reduction_args(config, scale=scale, seed=seed(start), counter=counter, kernels=kernels)
            reduced = all_reduce_8bit(values, group=group, **args)
        else:
            reduced = values.to(comm_dtype, copy=True)
            dist.all_reduce(reduced, group=group)
            if scale != 1.0:
                reduced.mul_(scale)
            counter.add_stock(end - start, world, reduced.element_size())
        write(start, end, reduced)
