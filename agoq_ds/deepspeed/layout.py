"""Where each gradient element of a DeepSpeed ZeRO-1/2 bucket goes: its owner map.

A bucket is a flat buffer holding the gradients of ``bucket.params`` back to back, in that order. A
parameter's gradient may straddle data-parallel partitions; DeepSpeed records, per (partition,
param), where the param's slice starts (``grad_start_offset``) and where it lands in the owner's
flat partition (``grad_partition_insertion_offset``). This is the same walk
``DeepSpeedZeroOptimizer.average_tensor`` does to build ``rank_and_offsets``, without merging
slices, so that each of this rank's slices keeps its place in the partition.

Each destination's slices are listed in partition order (param group, then insertion offset), not
bucket order: DeepSpeed fills buckets in backward order, the reverse of the partition layout, and a
reduce-scatter result already in partition order is added to the accumulator as one contiguous
piece instead of a scatter of dozens.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BucketLayout:
    """The owner map of one bucket and where this rank's slices go in its partitions."""

    owner_map: list[list[tuple[int, int]]]
    """Per destination rank: ``(bucket offset, numel)`` slices it owns, in partition order."""
    local: list[tuple[int, int, int]] = field(default_factory=list)
    """For ``owner_map[rank]``, in the same order: ``(param group, partition offset, numel)``."""
    numel: int = 0
    """Elements of the bucket covered by the slices (of the selected param groups)."""

    def local_by_group(self) -> dict[int, tuple[list[int], list[tuple[int, int]]]]:
        """Per param group: indices into ``local`` and their ``(partition offset, numel)`` pieces."""
        out: dict[int, tuple[list[int], list[tuple[int, int]]]] = {}
        for k, (group, offset, n) in enumerate(self.local):
            idx, pos = out.setdefault(group, ([], []))
            idx.append(k)
            pos.append((offset, n))
        return out


def bucket_layout(
    optimizer: Any,
    params: Sequence[tuple[int, int, int]],
    world_size: int,
    rank: int,
    groups: Collection[int] | None = None,
) -> BucketLayout:
    """The layout of a bucket holding ``params`` (``(group, index in group, param id)`` triples).

    ``optimizer`` is a ``DeepSpeedZeroOptimizer``; its partition bookkeeping is read, not changed.
    ``groups``: only the parameters of these param groups (the ones partitioned over one process group,
    ``reduction_groups``; ``world_size`` and ``rank`` are in that process group); the others keep their
    place in the bucket but own no slice.
    """
    # Per destination: (param group, partition offset, bucket offset, numel), sorted below.
    slices: list[list[tuple[int, int, int, int]]] = [[] for _ in range(world_size)]
    cursor = 0
    for group, index_in_group, param_id in params:
        param = optimizer.bit16_groups[group][index_in_group]
        if groups is not None and group not in groups:
            cursor += param.numel()
            continue
        starts = sorted(
            (
                (pid, int(optimizer.grad_start_offset[group][pid][param_id]))
                for pid in optimizer.param_to_partition_ids[group][param_id]
            ),
            key=lambda t: t[1],
        )
        for k, (pid, offset) in enumerate(starts):
            end = starts[k + 1][1] if k + 1 < len(starts) else param.numel()
            insert_at = int(optimizer.grad_partition_insertion_offset[group][pid][param_id])
            slices[pid].append((group, insert_at, cursor + offset, end - offset))
        cursor += param.numel()
    for own in slices:
        own.sort()
    owner_map = [[(bucket_offset, n) for _, _, bucket_offset, n in own] for own in slices]
    local = [(group, insert_at, n) for group, insert_at, _, n in slices[rank]]
    return BucketLayout(owner_map, local, sum(n for own in owner_map for _, n in own))


def reduction_groups(optimizer: Any, params: Sequence[tuple[int, int, int]]) -> list[tuple[Any, set[int]]]:
    """The process groups a bucket's gradients are reduced over, each with its param groups: one (the
    data-parallel group) without MoE; with MoE layers, each expert param group's expert-data-parallel
    group too (DeepSpeed's ``real_dp_process_group``), in the order the bucket first meets them."""
    out: list[tuple[Any, set[int]]] = []
    for group, _, _ in params:
        process_group = optimizer.real_dp_process_group[group]
        for known, members in out:
            if known is process_group:
                members.add(group)
                break
        else:
            out.append((process_group, {group}))
    return out
