"""A gradient partition crosses to the host once per optimizer step, in 8 bits.

With ZeRO-Offload the optimizer steps on the host from an fp32 gradient buffer there. Stock DeepSpeed
fills it by copying each parameter's gradient across at the accumulation boundary (in fp32), and with
gradient accumulation copies every accumulated gradient to the host and back at every micro-step.
agoq keeps the partition's gradient in int8 on the device across micro-batches, so at the boundary it
sends the int8 codes and the fp32 group scales (``1 + 4 / group_size`` bytes per element) and
dequantizes them on the host, with the compiled host kernels, straight into DeepSpeed's fp32 buffer.

The copies overlap the rest of backward, as DeepSpeed's own boundary copies do: in the boundary
backward each reduced bucket reports the partition ranges it wrote (``HostLink.written``) and the
quantization groups that became final are sent right away, on the stream that wrote them; the
boundary epilogue sends what is left (padding, unused parameters) and waits once.

``HostLink`` owns the host staging buffers (pinned when DeepSpeed pins its own) and the meter:
``OffloadMeter`` counts the gradient bytes that cross device<->host per step, and what DeepSpeed's own
offload path moves for the same gradients, which each host works out from DeepSpeed's code
(``stock_zero12_bytes``, ``stock_zero3_bytes``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from ..quant import Kernels, QuantizedTensor
from ..quant.format import num_groups
from ..quant.fused import dequantize_add_
from .accumulator import Accumulator, Fp32Accumulator, Int8Accumulator


class OffloadMeter:
    """Device<->host gradient bytes of the step in progress: agoq's and stock DeepSpeed's."""

    def __init__(self) -> None:
        self.sent_bytes = 0
        """Gradient bytes agoq moved between device and host in the step in progress."""
        self.baseline_bytes = 0
        """Bytes DeepSpeed's own offload path moves for the same gradients."""
        self.early_bytes = 0
        """Of ``sent_bytes``, those sent while backward was still running (``HostLink.written``)."""

    def figures(self) -> dict[str, float]:
        """``offload_bytes``, ``offload_bytes_baseline`` and their ratio (0 without offload), and
        ``offload_bytes_during_backward``: the part sent before the boundary backward ended."""
        ratio = self.sent_bytes / self.baseline_bytes if self.baseline_bytes else 0.0
        return {
            "offload_bytes": float(self.sent_bytes),
            "offload_bytes_during_backward": float(self.early_bytes),
            "offload_bytes_baseline": float(self.baseline_bytes),
            "offload_bytes_ratio": ratio,
        }

    def reset(self) -> None:
        """Start the next step's count."""
        self.sent_bytes = self.baseline_bytes = self.early_bytes = 0


def stock_zero12_bytes(
    *, owned_numel: int, touched_numel: int, grad_element_size: int, micro_steps: int, partitioned: bool
) -> int:
    """Gradient bytes DeepSpeed 0.19.8's ZeRO-1/2 offload path moves per step on one rank.

    ``owned_numel``: elements of the rank's partition; ``touched_numel``: elements of the parameters
    that have a piece in it (DeepSpeed copies whole parameters while accumulating). At the boundary
    each owned slice is copied into the fp32 host buffer (4 bytes per element). At ZeRO-2 with more
    than one micro-step, ``async_accumulate_grad_in_cpu_via_gpu`` also copies each touched parameter's
    gradient to the host at every micro-step and back at every one after the first. ZeRO-1 reduces
    only at the boundary and accumulates on the device, so it copies only there. (Checked against the
    copies DeepSpeed issues, counted on CPU: ``tests/gradient/test_offload.py``.)
    """
    boundary = 4 * owned_numel
    if micro_steps <= 1 or not partitioned:
        return boundary
    return boundary + (2 * micro_steps - 1) * touched_numel * grad_element_size


def stock_zero3_bytes(*, numel: int, accumulation_element_size: int, micro_steps: int) -> int:
    """Gradient bytes DeepSpeed 0.19.8's ZeRO-3 offload path moves per step on one rank, whose gradient
    partitions hold ``numel`` elements of data (padding is not copied; ``partition_grads`` and
    ``_offload_grad_partition_at_boundary``).

    The running sum lives on the host in the accumulation dtype. The first micro-step copies the
    reduced partition there and back to the device (``grad_buffer.to(device)``); every later one copies
    the sum to the device, adds, and copies it back; the boundary copies the device sum into the fp32
    host gradient (4 bytes per element): ``2 m a + 4`` bytes per element over ``m`` micro-steps."""
    return (2 * max(micro_steps, 1) * accumulation_element_size + 4) * numel


Interval = tuple[int, int]
"""A half-open range ``[start, end)``."""


def _union(intervals: list[Interval], new: list[Interval]) -> list[Interval]:
    """The sorted, merged union of two interval lists (touching intervals merge)."""
    out: list[Interval] = []
    for lo, hi in sorted(intervals + [iv for iv in new if iv[1] > iv[0]]):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _subtract(intervals: list[Interval], remove: list[Interval]) -> list[Interval]:
    """``intervals`` (sorted, disjoint) without the points of ``remove``."""
    out = list(intervals)
    for r_lo, r_hi in remove:
        kept: list[Interval] = []
        for lo, hi in out:
            if hi <= r_lo or lo >= r_hi:
                kept.append((lo, hi))
                continue
            if lo < r_lo:
                kept.append((lo, r_lo))
            if hi > r_hi:
                kept.append((r_hi, hi))
        out = kept
    return out


class ReadyGroups:
    """Which quantization groups of one partition are final in the boundary backward, and which of
    them were sent. A group is final once every element in it was written; a write to a group already
    sent (a second backward before the step) makes it due again."""

    def __init__(self, numel: int, group_size: int) -> None:
        self.numel = numel
        """Elements of the partition."""
        self.group_size = group_size
        """Elements per quantization group (1 for an fp32 accumulator)."""
        self.groups = num_groups(numel, group_size)
        """Groups of the partition."""
        self.written: list[Interval] = []
        """Element ranges written in this boundary backward (merged)."""
        self.sent: list[Interval] = []
        """Group ranges sent since (merged)."""

    def write(self, positions: list[tuple[int, int]]) -> list[Interval]:
        """Record writes of ``(offset, numel)`` pieces; returns the group ranges to send now."""
        gs = self.group_size
        pieces = [(off, off + n) for off, n in positions if n > 0]
        self.sent = _subtract(self.sent, [(lo // gs, num_groups(hi, gs)) for lo, hi in pieces])
        self.written = _union(self.written, pieces)
        complete = [(-(-lo // gs), self.groups if hi >= self.numel else hi // gs) for lo, hi in self.written]
        due = _subtract([iv for iv in complete if iv[1] > iv[0]], self.sent)
        self.sent = _union(self.sent, due)
        return due

    def remaining(self) -> list[Interval]:
        """The group ranges not sent yet."""
        return _subtract([(0, self.groups)], self.sent)


class HostLink:
    """Host staging for the per-step partition accumulators of one gradient host."""

    def __init__(
        self, *, pin: Callable[[torch.Tensor], torch.Tensor] | None, kernels: Kernels, meter: OffloadMeter
    ) -> None:
        self.pin = pin
        """Pins a host tensor (DeepSpeed's ``pin_memory`` when its offload pins), or None."""
        self.kernels = kernels
        """The host's kernel choice: the host dequantize runs on the compiled CPU kernels."""
        self.meter = meter
        """Bytes moved in the step in progress (the store's ``accounting.offload``)."""
        self._staging: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = {}
        self._ready: dict[Hashable, ReadyGroups] = {}
        self._streams: dict[int, torch.Stream] = {}

    def _buffers(self, key: Hashable, acc: Int8Accumulator) -> tuple[torch.Tensor, torch.Tensor]:
        staged = self._staging.get(key)
        if staged is None:
            codes = torch.empty(acc.numel, dtype=torch.int8)
            scales = torch.empty(num_groups(acc.numel, acc.group_size), dtype=torch.float32)
            if self.pin is not None:
                codes, scales = self.pin(codes), self.pin(scales)
            staged = self._staging[key] = (codes, scales)
        return staged

    def written(
        self, key: Hashable, acc: Accumulator, destination: torch.Tensor, positions: list[tuple[int, int]]
    ) -> None:
        """The boundary backward wrote ``positions`` of ``acc``: start copying the groups that are now
        final to the host (asynchronously, on the current stream, so after the writes)."""
        ready = self._ready.get(key)
        if ready is None:
            ready = self._ready[key] = ReadyGroups(acc.numel, self._granule(acc))
        before = self.meter.sent_bytes
        for g0, g1 in ready.write(positions):
            self._copy(key, acc, destination, g0, g1)
        self.meter.early_bytes += self.meter.sent_bytes - before

    def send(self, key: Hashable, acc: Accumulator, destination: torch.Tensor) -> None:
        """Start copying what ``written`` has not sent of ``acc``'s value to the host (asynchronously):
        the int8 codes and scales into staging buffers of ``key``, or an fp32 accumulator's value
        straight into ``destination``."""
        ready = self._ready.pop(key, None)
        if not acc.has_value:
            return
        ranges = ready.remaining() if ready is not None else [(0, num_groups(acc.numel, self._granule(acc)))]
        for g0, g1 in ranges:
            self._copy(key, acc, destination, g0, g1)

    @staticmethod
    def _granule(acc: Accumulator) -> int:
        return 1 if isinstance(acc, Fp32Accumulator) else acc.group_size

    def _copy(self, key: Hashable, acc: Accumulator, destination: torch.Tensor, g0: int, g1: int) -> None:
        """Copy groups ``[g0, g1)`` of ``acc`` to the host."""
        if acc.device.type != "cpu":
            stream = torch.accelerator.current_stream(acc.device)
            self._streams[id(stream)] = stream
        if isinstance(acc, Fp32Accumulator):
            destination[g0:g1].copy_(acc.dequantize()[g0:g1], non_blocking=True)
            self.meter.sent_bytes += 4 * (g1 - g0)
            return
        codes, scales = self._buffers(key, acc)
        lo, hi = g0 * acc.group_size, min(g1 * acc.group_size, acc.numel)
        codes[lo:hi].copy_(acc.codes[lo:hi], non_blocking=True)
        scales[g0:g1].copy_(acc.scales[g0:g1], non_blocking=True)
        self.meter.sent_bytes += (hi - lo) + 4 * (g1 - g0)

    def wait(self) -> None:
        """Wait for the copies started since the last wait: one host wait per stream they were queued
        on (each after the reduction that wrote what it copies)."""
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.synchronize()

    def receive(self, key: Hashable, acc: Accumulator, destination: torch.Tensor) -> None:
        """After the copies of ``send`` completed: write ``acc``'s value into the fp32 host buffer
        ``destination`` (zeros when nothing was accumulated); non-finite groups arrive as NaN."""
        if not acc.has_value:
            destination.zero_()
            return
        if isinstance(acc, Fp32Accumulator):
            return  # ``send`` copied it in place
        codes, scales = self._staging[key]
        staged = QuantizedTensor(codes, scales, None, torch.Size([acc.numel]), torch.float32, 8, acc.group_size)
        destination.zero_()
        dequantize_add_(destination.view(-1), staged, kernels=self.kernels)

    def state_bytes(self) -> int:
        """Host bytes held by the staging buffers."""
        return sum(c.numel() + 4 * s.numel() for c, s in self._staging.values())
