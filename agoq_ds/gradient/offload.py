"""A gradient partition crosses to the host once per optimizer step, in 8 bits.

With ZeRO-Offload the optimizer steps on the host from an fp32 gradient buffer there. Stock DeepSpeed
fills it by copying each parameter's gradient across at the accumulation boundary (in fp32), and with
gradient accumulation copies every accumulated gradient to the host and back at every micro-step.
agoq keeps the partition's gradient in int8 on the device across micro-batches, so at the boundary it
sends the int8 codes and the fp32 group scales (``1 + 4 / group_size`` bytes per element) and
dequantizes them on the host, with the compiled host kernels, straight into DeepSpeed's fp32 buffer.

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

    def figures(self) -> dict[str, float]:
        """``offload_bytes``, ``offload_bytes_baseline`` and their ratio (0 without offload)."""
        ratio = self.sent_bytes / self.baseline_bytes if self.baseline_bytes else 0.0
        return {
            "offload_bytes": float(self.sent_bytes),
            "offload_bytes_baseline": float(self.baseline_bytes),
            "offload_bytes_ratio": ratio,
        }

    def reset(self) -> None:
        """Start the next step's count."""
        self.sent_bytes = self.baseline_bytes = 0


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
        self._source: torch.device | None = None

    def _buffers(self, key: Hashable, acc: Int8Accumulator) -> tuple[torch.Tensor, torch.Tensor]:
        staged = self._staging.get(key)
        if staged is None:
            codes = torch.empty(acc.numel, dtype=torch.int8)
            scales = torch.empty(num_groups(acc.numel, acc.group_size), dtype=torch.float32)
            if self.pin is not None:
                codes, scales = self.pin(codes), self.pin(scales)
            staged = self._staging[key] = (codes, scales)
        return staged

    def send(self, key: Hashable, acc: Accumulator, destination: torch.Tensor) -> None:
        """Start copying ``acc``'s value to the host (asynchronously): the int8 codes and scales into
        staging buffers of ``key``, or an fp32 accumulator's value straight into ``destination``."""
        if not acc.has_value:
            return
        self._source = acc.device
        if isinstance(acc, Fp32Accumulator):
            destination.copy_(acc.dequantize(), non_blocking=True)
            self.meter.sent_bytes += 4 * acc.numel
            return
        codes, scales = self._buffers(key, acc)
        codes.copy_(acc.codes, non_blocking=True)
        scales.copy_(acc.scales, non_blocking=True)
        self.meter.sent_bytes += codes.numel() + 4 * scales.numel()

    def wait(self) -> None:
        """Wait for the copies ``send`` started: one host wait per step for all partitions (the copies
        were queued on the source device's current stream, after the reduction that wrote them)."""
        source, self._source = self._source, None
        if source is not None and source.type != "cpu":
            torch.accelerator.current_stream(source).synchronize()

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
