"""Per-step statistics of the 8-bit gradient path (bytes on the wire, buffer bytes, errors)."""

from __future__ import annotations

import math

from .collectives import CommCounter
from .offload import OffloadMeter


class GradientAccounting:
    """Counts one optimizer step's gradient traffic and buffers; ``finish_step`` snapshots them."""

    def __init__(self) -> None:
        self.comm = CommCounter()
        """Collective byte counts of the step in progress."""
        self.offload = OffloadMeter()
        """Device<->host gradient bytes of the step in progress (ZeRO-Offload)."""
        self.micro_steps = 0
        """Backward passes reduced or folded in the step in progress."""
        self.buffer_bytes = 0
        """Peak gradient-buffer bytes (codes + scales, or fp32) in the step in progress."""
        self.buffer_fp32_bytes = 0
        """fp32 bytes of the same gradient elements, at that peak."""
        self.ef_bytes = 0
        """Peak error-feedback residual bytes in the step in progress."""
        self._last: dict[str, float] = {}
        self._last_error: tuple = ()
        self.steps = 0
        """Finished steps."""

    def note_buffers(self, buffer_bytes: int, fp32_bytes: int, ef_bytes: int) -> None:
        """Record the current buffer sizes; the step keeps the peak."""
        if buffer_bytes >= self.buffer_bytes:
            self.buffer_bytes = buffer_bytes
            self.buffer_fp32_bytes = fp32_bytes
        self.ef_bytes = max(self.ef_bytes, ef_bytes)

    @property
    def last(self) -> dict[str, float]:
        """Figures of the last finished step (what ``agoq_stats`` reports); the error estimate, summed
        on the device during the step, is read here, when asked for, not at the end of every step."""
        if self._last_error:
            self._last.update(_error_figures(*self._last_error))
            self._last_error = ()
        return self._last

    def snapshot(self) -> dict[str, float]:
        """The figures of the step in progress."""
        return {**self._counts(), **_error_figures(self.comm.error_bound_sq, self.comm.reduced_sq)}

    def _counts(self) -> dict[str, float]:
        c = self.comm
        return {
            "comm_bytes": float(c.sent_bytes),
            "comm_bytes_received": float(c.received_bytes),
            "comm_bytes_baseline_fp32": c.baseline_fp32_bytes,
            "comm_bytes_baseline_bf16": c.baseline_bf16_bytes,
            "comm_bytes_ratio_fp32": c.sent_bytes / c.baseline_fp32_bytes if c.baseline_fp32_bytes else 0.0,
            "comm_bytes_ratio_bf16": c.sent_bytes / c.baseline_bf16_bytes if c.baseline_bf16_bytes else 0.0,
            "comm_elements": float(c.elements),
            "comm_calls": float(c.calls),
            "buffer_bytes": float(self.buffer_bytes),
            "buffer_bytes_fp32": float(self.buffer_fp32_bytes),
            "buffer_bytes_ratio_fp32": self.buffer_bytes / self.buffer_fp32_bytes if self.buffer_fp32_bytes else 0.0,
            "ef_bytes": float(self.ef_bytes),
            "state_bytes": float(self.buffer_bytes + self.ef_bytes),
            "state_bytes_ratio_fp32": (
                (self.buffer_bytes + self.ef_bytes) / self.buffer_fp32_bytes if self.buffer_fp32_bytes else 0.0
            ),
            "micro_steps": float(self.micro_steps),
            **self.offload.figures(),
        }

    def finish_step(self) -> None:
        """Snapshot the step (without reading the device) and reset the counters for the next one."""
        self.steps += 1
        self._last = {**self._counts(), "steps": float(self.steps)}
        self._last_error = (self.comm.error_bound_sq, self.comm.reduced_sq)
        self.comm.reset()
        self.offload.reset()
        self.micro_steps = 0
        self.buffer_bytes = self.buffer_fp32_bytes = self.ef_bytes = 0


def _error_figures(error_bound_sq, reduced_sq) -> dict[str, float]:
    """Relative error bound of the step's reduce-scatter results, and its RMS estimate (reads the
    device when the sums are device tensors)."""
    err, ref = float(error_bound_sq), float(reduced_sq)
    rel = math.sqrt(err / ref) if ref > 0 else 0.0
    # Round-to-nearest errors are close to uniform on [-b, b]: RMS = b / sqrt(3).
    return {"rs_error_bound_rel": rel, "rs_error_est_rel": rel / math.sqrt(3.0)}
