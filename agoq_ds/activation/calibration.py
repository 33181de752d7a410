"""Measurements the allocators work from, taken during calibration steps.

Per (module, class) "unit": elements, quantization groups and unquantized bytes saved per
micro-batch; the bytes of tensors that are never quantized (small, integer, statistics); and per
class the quantization error at each candidate bit-width, ``sum |x - Q_b(x)|^2 / sum |x|^2`` over
that class's saved tensors (on up to ``MAX_GROUPS`` evenly spaced groups of each tensor), which is
the sensitivity budget mode and stage balancing allocate by. Everything is deterministic for a given
model, data and seed (round-to-nearest, fixed sampling).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from ..quant import dequantize, quantize
from ..quant.format import num_groups
from .storage import QuantSpec, tensor_bytes

MAX_GROUPS = 1024
"""Groups per tensor used to measure quantization error."""


@dataclass
class Unit:
    """Saved tensors of one (module, class) in one micro-batch."""

    module: str
    """Module name."""
    cls: str
    """Layer class."""
    numel: int
    """Elements per micro-batch."""
    groups: int
    """Quantization groups (scales) per micro-batch."""
    baseline: int
    """Bytes per micro-batch unquantized."""
    bits: int = 16
    """Current bit-width."""
    pinned: bool = False
    """Fixed by the user (exclude/rule/class_bits): allocators leave it."""

    def nbytes(self, bits: int, scale_bytes: int) -> int:
        """Stored bytes per micro-batch at ``bits`` (16: unquantized)."""
        if bits >= 16:
            return self.baseline
        return -(-self.numel * bits // 8) + self.groups * scale_bytes


class Calibration:
    """Accumulates unit sizes and per-class quantization errors over the observed forwards."""

    def __init__(self, spec: QuantSpec, candidate_bits: list[int], measure_errors: bool = True) -> None:
        self.spec = spec
        self.candidates = sorted({b for b in candidate_bits if b < 16})
        self.measure_errors = measure_errors
        self.units: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        """(module, class) -> [elements, groups, bytes] summed over forwards."""
        self.fixed = [0, 0]
        """[elements, bytes] of never-quantized tensors, summed over forwards."""
        self.errors: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
        """class -> bits -> [sum squared error, sum squared value]."""
        self.recomputed: set[str] = set()
        """Classes with tensors recomputed in backward (stored nothing)."""

    def observe(self, t: torch.Tensor | None, cls: str, module: str, quantizable: bool, numel: int = 0) -> None:
        """Account one saved tensor (called by the pack engine before it is stored; ``t=None`` with
        ``numel`` for a tensor recomputed in backward, which stores nothing)."""
        if t is None:
            self.fixed[0] += numel
            self.recomputed.add(cls)
            return
        if not quantizable:
            self.fixed[0] += t.numel()
            self.fixed[1] += tensor_bytes(t)
            return
        unit = self.units[(module, cls)]
        unit[0] += t.numel()
        unit[1] += num_groups(t.numel(), self.spec.group_size)
        unit[2] += tensor_bytes(t)
        if self.measure_errors:
            self._measure(t, cls)

    @torch.no_grad()
    def _measure(self, t: torch.Tensor, cls: str) -> None:
        g = self.spec.group_size
        flat = t.detach().reshape(-1)
        n = flat.numel() // g
        if n == 0:
            return
        rows = flat[: n * g].view(n, g)
        if n > MAX_GROUPS:
            rows = rows[torch.linspace(0, n - 1, MAX_GROUPS, device=t.device).long()]
        x = rows.contiguous()
        ref = float(x.float().square().sum())
        for bits in self.candidates:
            q = quantize(x, bits, g, scale_dtype=self.spec.scale_dtype, kernels=self.spec.kernels)
            err = float((dequantize(q, kernels=self.spec.kernels).float() - x.float()).square().sum())
            acc = self.errors[cls][bits]
            acc[0] += err
            acc[1] += ref

    def sensitivity(self) -> dict[str, dict[int, float]]:
        """class -> bits -> relative squared error (0 at 16 bits)."""
        out: dict[str, dict[int, float]] = {}
        for cls, by_bits in sorted(self.errors.items()):
            out[cls] = {b: (e / r if r > 0 else 0.0) for b, (e, r) in sorted(by_bits.items())}
            out[cls][16] = 0.0
        return out

    def per_micro_batch(self, forwards: int) -> tuple[list[Unit], int, int]:
        """(units, fixed elements, fixed bytes), each per micro-batch (averaged over ``forwards``)."""
        f = max(forwards, 1)
        units = [
            Unit(module, cls, numel // f, groups // f, nbytes // f)
            for (module, cls), (numel, groups, nbytes) in sorted(self.units.items())
        ]
        return units, self.fixed[0] // f, self.fixed[1] // f
