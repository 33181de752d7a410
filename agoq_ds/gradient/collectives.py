"""8-bit gradient collectives: a true reduce-scatter and an all-reduce built on it.

``reduce_scatter_8bit(flat, owner_map)``: ``owner_map[d]`` lists the ``(offset, numel)`` slices of
``flat`` that rank ``d`` owns (DeepSpeed's bucket owner map). Every rank concatenates each
destination's slices into one segment, quantizes it blockwise (int8 codes, one fp32 scale per
``group_size`` consecutive elements of the segment), packs scales and codes into one byte buffer and
sends all segments in one exchange (``exchange_bytes``); shares above ``ROUND_ELEMENTS`` go in rounds
of that size, so no send or receive buffer grows with the bucket. The receiver dequantizes
what each peer sent and sums in fp32, adding its own contribution unquantized. Nothing is summed in
8 bits, so the error of the result is at most the sum over senders of their per-group quantization
bound (``agoq_ds.quant.bound``) — unlike an int8 sum with a shared scale, whose codes overflow.

``all_reduce_8bit(flat)``: that reduce-scatter over even chunks, then the owner quantizes its reduced
chunk once more and an int8 all-gather gives every rank the same (bit-identical) full result.

Byte accounting (``CommCounter``) counts what each rank puts on the wire: the non-self send splits
of the all-to-all, and ``(N-1)`` chunks for a ring all-gather. Baselines use DeepSpeed's reduction:
a ring all-reduce of the bucket, ``2 (N-1) / N * numel * element_size`` per rank, or at ZeRO-3 a ring
reduce-scatter, ``(N-1) / N * numel * element_size``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Any

import torch

from ..quant import Kernels, QuantizedTensor, bound, dequantize, quantize
from ..quant.format import num_groups
from ..quant.fused import dequantize_add_
from .comm import deepspeed_comm

if TYPE_CHECKING:
    from ..config import GradientConfig

dist = deepspeed_comm(globals())
"""``deepspeed.comm``, imported on first use (``comm.py``)."""

OwnerMap = Sequence[Sequence[tuple[int, int]]]
"""Per destination rank, the ``(offset, numel)`` slices of the flat bucket it owns."""

_SCALE_BYTES = 4
_ALIGN = 4  # codes are padded so that the next sender's fp32 scales stay 4-byte aligned


def ring_allreduce_bytes(numel: int, world_size: int, element_size: int) -> float:
    """Bytes one rank sends in a ring all-reduce of ``numel`` elements (DeepSpeed's baseline)."""
    return 2.0 * (world_size - 1) / world_size * numel * element_size if world_size > 1 else 0.0


def reduce_scatter_bytes(numel: int, world_size: int, element_size: int) -> float:
    """Bytes one rank sends in a ring reduce-scatter of ``numel`` elements (DeepSpeed's ZeRO-3 baseline)."""
    return (world_size - 1) / world_size * numel * element_size if world_size > 1 else 0.0


def packed_segment_bytes(numel: int, group_size: int) -> int:
    """Bytes of one quantized segment on the wire: fp32 scales, then int8 codes padded to 4 bytes."""
    if numel == 0:
        return 0
    return _SCALE_BYTES * num_groups(numel, group_size) + _round_up(numel, _ALIGN)


@dataclass
class CommCounter:
    """Running byte counts of the gradient collectives of one rank."""

    sent_bytes: int = 0
    """Bytes this rank handed to collectives for other ranks (its wire bytes)."""
    received_bytes: int = 0
    """Bytes this rank received from other ranks."""
    elements: int = 0
    """Gradient elements reduced (bucket sizes, summed)."""
    baseline_fp32_bytes: float = 0.0
    """What DeepSpeed's fp32 reduction of the same buckets would send (ring all-reduce; ZeRO-3: ring
    reduce-scatter)."""
    baseline_bf16_bytes: float = 0.0
    """The same in bf16."""
    calls: int = 0
    """Collective launches."""
    error_bound_sq: torch.Tensor | float = 0.0
    """Sum of squared per-element error bounds of the reduce-scatter results (receiver side). A
    device tensor once something was reduced: summed on the device, read only when reported, so
    that the diagnostic never makes the host wait for the device."""
    reduced_sq: torch.Tensor | float = 0.0
    """Squared L2 norm of the reduce-scatter results (receiver side); a device tensor like
    ``error_bound_sq``."""

    def add_baseline(self, numel: int, world_size: int, *, reduce_scatter: bool = False) -> None:
        """Record that a bucket of ``numel`` elements was reduced among ``world_size`` ranks, by a ring
        all-reduce in stock DeepSpeed (ZeRO 0-2) or a reduce-scatter (``reduce_scatter``: ZeRO-3)."""
        bytes_of = reduce_scatter_bytes if reduce_scatter else ring_allreduce_bytes
        self.elements += numel
        self.baseline_fp32_bytes += bytes_of(numel, world_size, 4)
        self.baseline_bf16_bytes += bytes_of(numel, world_size, 2)

    def add_stock(self, numel: int, world_size: int, element_size: int, *, all_reduce: bool = True) -> None:
        """Record a reduction DeepSpeed ran itself (``communication_bits: 32``): one launch and what its
        ring all-reduce (``all_reduce=False``: ring reduce-scatter) of ``numel`` elements sends."""
        bytes_of = ring_allreduce_bytes if all_reduce else reduce_scatter_bytes
        self.sent_bytes += int(bytes_of(numel, world_size, element_size))
        self.calls += 1

    def reset(self) -> None:
        """Zero every count."""
        fresh = CommCounter()
        self.__dict__.update(fresh.__dict__)


def reduction_args(
    config: GradientConfig, *, scale: float, seed: int, counter: CommCounter, kernels: Kernels | None = None
) -> dict[str, Any]:
    """The keyword arguments every host passes to ``reduce_scatter_8bit`` / ``all_reduce_8bit`` (all
    but ``group``): the configured group size, rounding and exact-path threshold, the averaging
    ``scale``, the stochastic-rounding ``seed``, the host's byte meter and its engine's kernel choice
    (``store.kernels``; ``None``: the process default)."""
    return {
        "kernels": kernels,
        "group_size": config.group_size,
        "stochastic": config.rounding == "stochastic",
        "seed": seed,
        "scale": scale,
        "counter": counter,
        "exact_below": config.min_numel,
    }


@dataclass
class ReduceScatterResult:
    """What ``reduce_scatter_8bit`` returns on one rank."""

    values: torch.Tensor
    """This rank's reduced slices, concatenated in ``owner_map[rank]`` order, fp32."""
    group_bound: torch.Tensor
    """Per group of ``values`` (``group_size`` consecutive elements), the sum over the senders of their
    round-to-nearest quantization bound, already multiplied by ``scale`` (fp32)."""
    sent_bytes: int
    """Bytes this rank sent to other ranks."""
    received_bytes: int
    """Bytes this rank received."""

    def error_bound_sq(self, group_size: int) -> torch.Tensor:
        """Squared L2 norm of the per-element error bound of ``values`` (a 0-d device tensor)."""
        n = self.values.numel()
        if n == 0:
            return self.values.new_zeros(())
        # fp32 dot products: a diagnostic on the hot path, not worth fp64 passes over the data.
        sizes = torch.full_like(self.group_bound, float(group_size))
        sizes[-1] = n - group_size * (self.group_bound.numel() - 1)
        return torch.dot(self.group_bound * self.group_bound, sizes)

    def error_bound_l2(self, group_size: int) -> float:
        """L2 norm of the per-element error bound of ``values`` (reads the device: not for the hot path)."""
        return math.sqrt(float(self.error_bound_sq(group_size)))


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


ROUND_ELEMENTS = 1 << 24
"""Elements of each destination's share one exchange round of ``reduce_scatter_8bit`` carries at most
(rounded down to whole quantization groups): 16M elements, 16.5 MB of packed codes and scales per peer
and round. A bucket share up to this size goes in one exchange, as before rounds existed."""


def _round_seed(seed: int, dest: int, start: int) -> int:
    """The stochastic-rounding seed of the segment for ``dest`` that starts ``start`` elements into its
    share (the first round keeps the seed of a single exchange)."""
    base = (seed * 65599 + dest) % (2**31)
    return base if start == 0 else (base * 1000003 + start // ROUND_ELEMENTS) % (2**31)


def sub_slices(slices: Sequence[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """The parts of ``slices`` (concatenated) from element ``start`` to ``end``, as ``(offset, numel)``."""
    out, position = [], 0
    for off, n in slices:
        lo, hi = max(start, position), min(end, position + n)
        if lo < hi:
            out.append((off + lo - position, hi - lo))
        position += n
        if position >= end:
            break
    return out


def gather_slices(flat: torch.Tensor, slices: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The ``(offset, numel)`` slices of a 1-D tensor, concatenated (a view when there is one)."""
    if len(slices) == 1:
        off, n = slices[0]
        return flat.narrow(0, off, n)
    if not slices:
        return flat.new_empty(0)
    return torch.cat([flat.narrow(0, off, n) for off, n in slices])


def _pack(q: QuantizedTensor) -> torch.Tensor:
    """Scales then codes (padded to 4 bytes) of one quantized segment, as uint8."""
    codes = q.codes.view(torch.uint8)
    pad = _round_up(codes.numel(), _ALIGN) - codes.numel()
    parts = [q.scales.float().view(torch.uint8), codes]
    if pad:
        parts.append(codes.new_zeros(pad))
    return torch.cat(parts)


def _unpack(buf: torch.Tensor, numel: int, group_size: int, dtype: torch.dtype) -> QuantizedTensor:
    g = num_groups(numel, group_size)
    scales = buf.narrow(0, 0, _SCALE_BYTES * g).view(torch.float32)
    codes = buf.narrow(0, _SCALE_BYTES * g, numel).view(torch.int8)
    return QuantizedTensor(codes, scales, None, torch.Size([numel]), dtype, 8, group_size)


def _check_owner_map(owner_map: OwnerMap, world_size: int, numel: int) -> None:
    if len(owner_map) != world_size:
        raise ValueError(f"owner_map has {len(owner_map)} entries for {world_size} ranks")
    for dest, slices in enumerate(owner_map):
        for off, n in slices:
            if off < 0 or n < 0 or off + n > numel:
                raise ValueError(f"owner_map[{dest}] slice ({off}, {n}) is outside the flat tensor of {numel}")


def exchange_bytes(
    recv: torch.Tensor,
    send: torch.Tensor,
    recv_splits: Sequence[int],
    send_splits: Sequence[int],
    *,
    group=None,
    point_to_point: bool | None = None,
) -> None:
    """An all-to-all of 1-D byte buffers with uneven splits (``all_to_all_single`` semantics).

    On gloo it is one batch of point-to-point sends and receives (``point_to_point=None`` picks by
    backend): gloo's ``all_to_all`` moves the two directions of a link one after the other — 16 MB
    each way took 0.26 s on a 1 Gbit/s link, the same exchange as ``batch_isend_irecv`` 0.13 s,
    which is what a full-duplex link allows. Other backends (NCCL) use ``all_to_all_single``.
    """
    if point_to_point is None:
        point_to_point = torch.distributed.get_backend(group) == "gloo"
    if not point_to_point:
        dist.all_to_all_single(
            recv, send, output_split_sizes=list(recv_splits), input_split_sizes=list(send_splits), group=group
        )
        return
    rank = dist.get_rank(group=group)
    ops = []
    for peer, (offset, n) in enumerate(zip(accumulate(recv_splits, initial=0), recv_splits, strict=False)):
        if peer != rank and n:
            ops.append(dist.P2POp(dist.irecv, recv.narrow(0, offset, n), _global_rank(group, peer), group))
    for peer, (offset, n) in enumerate(zip(accumulate(send_splits, initial=0), send_splits, strict=False)):
        if peer != rank and n:
            ops.append(dist.P2POp(dist.isend, send.narrow(0, offset, n), _global_rank(group, peer), group))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()


def _global_rank(group, group_rank: int) -> int:
    return group_rank if group is None else torch.distributed.get_global_rank(group, group_rank)


def reduce_scatter_8bit(flat: torch.Tensor, owner_map: OwnerMap, **kwargs: Any) -> ReduceScatterResult:
    """Sum ``flat`` over the ranks of ``group``, each rank receiving only the slices it owns: every
    round of ``reduce_scatter_8bit_rounds`` (same arguments) at once.

    ``flat`` is 1-D (fp32, bf16 or fp16) with the same layout on every rank; ``owner_map`` must be
    identical on every rank. Returns this rank's slices of ``scale * sum_r flat_r`` in fp32, in
    ``owner_map[rank]`` order (on a single rank with ``scale`` 1: ``flat``'s own values and dtype,
    a view when the slices are contiguous). One exchange per round (none when ``flat`` is empty), so
    every rank must call this with the same owner map. Fewer than ``exact_below`` elements are summed
    exactly instead (one fp32 all-reduce; the error bound is 0).
    """
    rounds = list(reduce_scatter_8bit_rounds(flat, owner_map, **kwargs))
    if len(rounds) == 1:
        return rounds[0]
    if not rounds:  # the owner map covers nothing
        empty = torch.zeros(0, dtype=torch.float32, device=flat.device)
        return ReduceScatterResult(empty, empty.clone(), 0, 0)
    return ReduceScatterResult(
        torch.cat([r.values for r in rounds]),
        torch.cat([r.group_bound for r in rounds]),
        sum(r.sent_bytes for r in rounds),
        sum(r.received_bytes for r in rounds),
    )


def reduce_scatter_8bit_rounds(
    flat: torch.Tensor,
    owner_map: OwnerMap,
    *,
    group=None,
    group_size: int = 128,
    stochastic: bool = False,
    seed: int = 0,
    scale: float = 1.0,
    counter: CommCounter | None = None,
    exact_below: int = 0,
    kernels: Kernels | None = None,
) -> Iterator[ReduceScatterResult]:
    """``reduce_scatter_8bit`` round by round: yields this rank's reduced values of each exchange round
    in order (consecutive pieces of its share, each at most ``ROUND_ELEMENTS`` long, a multiple of the
    group size), so a caller that stores each round before taking the next never holds more than one
    round in fp32. Every rank must consume every round (each is a collective)."""
    world = dist.get_world_size(group=group)
    rank = dist.get_rank(group=group)
    if flat.dim() != 1:
        raise ValueError(f"reduce_scatter_8bit: flat must be 1-D, got shape {tuple(flat.shape)}")
    _check_owner_map(owner_map, world, flat.numel())
    lengths = [sum(n for _, n in slices) for slices in owner_map]
    mine = lengths[rank]
    if 0 < flat.numel() < exact_below and world > 1:
        full = _exact_all_reduce(flat, group, scale, counter)
        values = gather_slices(full, owner_map[rank])
        yield ReduceScatterResult(values, values.new_zeros(num_groups(mine, group_size)), 0, 0)
        return
    if flat.numel() == 0 or world == 1:
        # Nothing to exchange: the rank's own values, without a full-size fp32 copy of the bucket
        # (with scale 1 a view of ``flat``, in its dtype, when the slices are one run; callers consume
        # them before the bucket is reused). Two such copies were 2x4 bytes per element on one GPU.
        own = gather_slices(flat, owner_map[rank])
        values = own.float().mul_(scale) if scale != 1.0 else own
        yield ReduceScatterResult(values, values.new_zeros(num_groups(mine, group_size), dtype=torch.float32), 0, 0)
        return
    # Exchange rounds of at most ``ROUND_ELEMENTS`` elements of each destination's share (a multiple of
    # the group size, so every quantization group is the one a single exchange would use): no send,
    # receive or fp32 buffer grows with the bucket. Every rank derives the same rounds from the owner map.
    step = max(ROUND_ELEMENTS // group_size, 1) * group_size
    for start in range(0, max(lengths), step):
        send_parts, send_splits = [], []
        for dest in range(world):
            n = min(max(lengths[dest] - start, 0), step)
            if dest == rank or n == 0:
                send_splits.append(0)
                continue
            segment = gather_slices(flat, sub_slices(owner_map[dest], start, start + n))
            q = quantize(
                segment, 8, group_size, stochastic=stochastic, seed=_round_seed(seed, dest, start), kernels=kernels
            )
            packed = _pack(q)
            send_parts.append(packed)
            send_splits.append(packed.numel())
        n_mine = min(max(mine - start, 0), step)
        recv_one = packed_segment_bytes(n_mine, group_size)
        recv_splits = [0 if src == rank else recv_one for src in range(world)]
        if len(send_parts) == 1:  # two ranks: the one packed segment is the send buffer, no copy
            send = send_parts[0]
        else:
            send = torch.cat(send_parts) if send_parts else flat.new_empty(0, dtype=torch.uint8)
        del send_parts
        recv = torch.empty(sum(recv_splits), dtype=torch.uint8, device=flat.device)
        exchange_bytes(recv, send, recv_splits, send_splits, group=group)
        sent, received = int(send.numel()), int(recv.numel())
        del send
        mine_slices = sub_slices(owner_map[rank], start, start + n_mine)
        own = gather_slices(flat, mine_slices).float()
        # Summed in place: ``own`` is a fresh fp32 copy unless ``flat`` was fp32 and the slices one run
        # (then a view of it, which must not change). Empty when this round holds none of the share.
        total = own.clone() if flat.dtype == torch.float32 and len(mine_slices) <= 1 else own
        group_bound = total.new_zeros(num_groups(n_mine, group_size))
        offset = 0
        for src in range(world):  # fixed order: the result does not depend on arrival order
            if recv_splits[src] == 0:
                continue
            q = _unpack(recv.narrow(0, offset, recv_splits[src]), n_mine, group_size, torch.float32)
            dequantize_add_(total, q, kernels=kernels)
            group_bound += bound(q)
            offset += recv_splits[src]
        del recv
        if scale != 1.0:
            total.mul_(scale)
            group_bound *= abs(scale)
        result = ReduceScatterResult(total, group_bound, sent, received)
        if counter is not None:
            counter.sent_bytes += sent
            counter.received_bytes += received
            counter.error_bound_sq = counter.error_bound_sq + result.error_bound_sq(group_size)
            counter.reduced_sq = counter.reduced_sq + torch.dot(total, total)
        yield result
    if counter is not None:
        counter.calls += 1


def _exact_all_reduce(flat: torch.Tensor, group, scale: float, counter: CommCounter | None) -> torch.Tensor:
    """``scale * sum_r flat_r`` in fp32 by one fp32 all-reduce (counted like one)."""
    full = flat.float().clone() if flat.dtype == torch.float32 else flat.float()
    dist.all_reduce(full, group=group)
    if scale != 1.0:
        full.mul_(scale)
    if counter is not None:
        counter.sent_bytes += int(ring_allreduce_bytes(flat.numel(), dist.get_world_size(group=group), 4))
        counter.calls += 1
    return full


def even_owner_map(numel: int, world_size: int) -> list[list[tuple[int, int]]]:
    """Contiguous near-equal chunks, the first ``numel % world_size`` one element longer."""
    base, extra = divmod(numel, world_size)
    out, start = [], 0
    for r in range(world_size):
        n = base + (1 if r < extra else 0)
        out.append([(start, n)] if n else [])
        start += n
    return out


def all_reduce_8bit(
    flat: torch.Tensor,
    *,
    group=None,
    group_size: int = 128,
    stochastic: bool = False,
    seed: int = 0,
    scale: float = 1.0,
    counter: CommCounter | None = None,
    exact_below: int = 0,
    kernels: Kernels | None = None,
) -> torch.Tensor:
    """``scale * sum_r flat_r`` on every rank, in fp32, identical on all ranks (exactly, by one fp32
    all-reduce, for fewer than ``exact_below`` elements).

    An 8-bit reduce-scatter over even chunks, then each owner quantizes its reduced chunk (int8,
    fp32 scales) and one all-gather distributes the chunks; every rank, the owner included, uses the
    dequantized chunks so that replicas stay bit-identical.
    """
    world = dist.get_world_size(group=group)
    rank = dist.get_rank(group=group)
    if world == 1 or flat.numel() == 0:
        return flat.float() * scale
    if flat.numel() < exact_below:
        return _exact_all_reduce(flat, group, scale, counter)
    owner_map = even_owner_map(flat.numel(), world)
    reduced = reduce_scatter_8bit(
        flat,
        owner_map,
        group=group,
        group_size=group_size,
        stochastic=stochastic,
        seed=seed,
        scale=scale,
        counter=counter,
        kernels=kernels,
    ).values
    chunk_lengths = [sum(n for _, n in s) for s in owner_map]
    slot = max(packed_segment_bytes(n, group_size) for n in chunk_lengths)
    mine = torch.zeros(slot, dtype=torch.uint8, device=flat.device)
    if reduced.numel():
        q = quantize(
            reduced, 8, group_size, stochastic=stochastic, seed=(seed * 65599 + world + rank) % (2**31), kernels=kernels
        )
        packed = _pack(q)
        mine[: packed.numel()] = packed
    gathered = torch.empty(slot * world, dtype=torch.uint8, device=flat.device)
    dist.all_gather_into_tensor(gathered, mine, group=group)
    parts = []
    for src, n in enumerate(chunk_lengths):
        if n:
            q = _unpack(gathered.narrow(0, src * slot, slot), n, group_size, torch.float32)
            parts.append(dequantize(q, kernels=kernels))
    if counter is not None:
        counter.sent_bytes += slot * (world - 1)
        counter.received_bytes += slot * (world - 1)
        counter.calls += 1
    return torch.cat(parts)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact|| / ||exact||`` in fp64 (0 when both are empty or exact is zero)."""
    denom = float(exact.double().norm())
    diff = float((approx.double() - exact.double()).norm())
    return diff / denom if denom > 0 else (0.0 if diff == 0 else math.inf)
