"""Per-step statistics of the 8-bit gradient path (bytes on the wire, buffer bytes, errors)."""

from __future__ import annotations

import math

from .collectives import CommCounter


class GradientAccounting:
    """Counts one optimizer step's gradient traffic and buffers; ``finish_step`` snapshots them."""

    def __init__(self) -> None:
        self.comm = CommCounter()
        """Collective byte counts of the step in progress."""
        self.micro_steps = 0
        """Backward passes reduced or folded in the step in progress."""
        self.buffer_bytes = 0
        """Peak gradient-buffer bytes (codes + scales, or fp32) in the step in progress."""
        self.buffer_fp32_bytes = 0
        """fp32 bytes of the same gradient elements, at that peak."""
        self.ef_bytes = 0
        """Peak error-feedback residual bytes in the step in progress."""
        self.last: dict[str, float] = {}
        """Snapshot of the last finished step (what ``agoq_stats`` reports)."""
        self.steps = 0
        """Finished steps."""

    def note_buffers(self, buffer_bytes: int, fp32_bytes: int, ef_bytes: int) -> None:
        """Record the current buffer sizes; the step keeps the peak."""
        if buffer_bytes >= self.buffer_bytes:
            self.buffer_bytes = buffer_bytes
            self.buffer_fp32_bytes = fp32_bytes
        self.ef_bytes = max(self.ef_bytes, ef_bytes)

    def snapshot(self) -> dict[str, float]:
        """The figures of the step in progress."""
        c = self.comm
        rel = math.sqrt(c.error_bound_sq / c.reduced_sq) if c.reduced_sq > 0 else 0.0
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
            "rs_error_bound_rel": rel,
            # Round-to-nearest errors are close to uniform on [-b, b]: RMS = b / sqrt(3).
            "rs_error_est_rel": rel / math.sqrt(3.0),
            "micro_steps": float(self.micro_steps),
        }

    def finish_step(self) -> dict[str, float]:
        """Snapshot the step, reset the counters for the next one, and return the snapshot."""
        self.last = self.snapshot()
        self.steps += 1
        self.last["steps"] = float(self.steps)
        self.comm.reset()
        self.micro_steps = 0
        self.buffer_bytes = self.buffer_fp32_bytes = self.ef_bytes = 0
        return self.last
