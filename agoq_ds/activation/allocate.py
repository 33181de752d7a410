"""Choosing bit-widths from measurements: budget mode and pipeline-stage balancing.

Both are greedy over "knobs" (a layer class for budget mode, a (module, class) unit for stage
balancing) and rank a move by the quantization error it adds per byte it saves, using the
per-class sensitivity from ``calibration.py`` (or the prior ``4**-bits``, how uniform quantization
noise scales, where nothing was measured). Ties break by size, then name: the result depends only
on the measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

from .calibration import Unit

Sensitivity = dict[str, dict[int, float]]
"""class -> bits -> relative squared quantization error."""


def error(sensitivity: Sensitivity, cls: str, bits: int) -> float:
    """Relative squared error of ``cls`` at ``bits`` (measured, else the ``4**-bits`` prior)."""
    if bits >= 16:
        return 0.0
    measured = sensitivity.get(cls, {})
    return measured[bits] if bits in measured else 4.0**-bits


def pipeline_holds(stage_id: int, num_stages: int, micro_batches: int) -> int:
    """Micro-batches of activations stage ``stage_id`` holds under DeepSpeed's 1F1B schedule
    (``TrainSchedule.num_pipe_buffers``): ``max(2, min(S - s, M))``; 1 without a pipeline (each
    micro-batch's backward runs before the next forward)."""
    if num_stages <= 1:
        return 1
    return max(2, min(num_stages - stage_id, micro_batches))


def allocate_budget(
    units: list[Unit],
    fixed_numel: int,
    fixed_bytes: int,
    sensitivity: Sensitivity,
    candidates: list[int],
    scale_bytes: int,
    *,
    target_avg_bits: float | None = None,
    budget_bytes: int | None = None,
    holds: int = 1,
    floors: dict[str, int] | None = None,
) -> dict[str, int]:
    """Bits per (non-pinned) class meeting ``target_avg_bits`` (stored bits per element, scales
    included, over every saved element) and/or ``budget_bytes`` (``holds`` micro-batches of stored
    bytes), with the least measured error.

    Starts every class at the largest candidate, lowers the class with the smallest error increase
    per byte saved until the budget holds, then raises classes again (largest error decrease per
    byte first) while it still holds. ``floors`` (class -> bits) are not gone below unless the
    budget cannot be met with them; if even the smallest candidates do not fit, returns them.
    """
    args = (units, fixed_numel, fixed_bytes, sensitivity, sorted(set(candidates)), scale_bytes)
    limits = (target_avg_bits, budget_bytes, holds)
    if floors:
        assign, met = _greedy(*args, *limits, floors)
        if met:
            return assign
    return _greedy(*args, *limits, {})[0]


def _greedy(
    units: list[Unit],
    fixed_numel: int,
    fixed_bytes: int,
    sensitivity: Sensitivity,
    cands: list[int],
    scale_bytes: int,
    target_avg_bits: float | None,
    budget_bytes: int | None,
    holds: int,
    floors: dict[str, int],
) -> tuple[dict[str, int], bool]:
    knobs = sorted({u.cls for u in units if not u.pinned})
    assign = {c: cands[-1] for c in knobs}
    total_numel = fixed_numel + sum(u.numel for u in units)

    def class_bytes(cls: str, bits: int) -> int:
        return sum(u.nbytes(bits, scale_bytes) for u in units if u.cls == cls and not u.pinned)

    def fits(nbytes: int) -> bool:
        if target_avg_bits is not None and 8 * nbytes > target_avg_bits * total_numel:
            return False
        return budget_bytes is None or holds * nbytes <= budget_bytes

    current = fixed_bytes + sum(u.nbytes(u.bits, scale_bytes) for u in units if u.pinned)
    current += sum(class_bytes(c, b) for c, b in assign.items())
    while not fits(current):
        best = None
        for c in knobs:
            i = cands.index(assign[c])
            if i == 0 or cands[i - 1] < floors.get(c, 0):
                continue
            saved = class_bytes(c, assign[c]) - class_bytes(c, cands[i - 1])
            if saved <= 0:
                continue
            cost = error(sensitivity, c, cands[i - 1]) - error(sensitivity, c, assign[c])
            key = (cost / saved, -saved, c)
            if best is None or key < best[0]:
                best = (key, c, cands[i - 1], saved)
        if best is None:
            break
        assign[best[1]] = best[2]
        current -= best[3]
    met = fits(current)
    while met:
        best = None
        for c in knobs:
            i = cands.index(assign[c])
            if i == len(cands) - 1:
                continue
            extra = class_bytes(c, cands[i + 1]) - class_bytes(c, assign[c])
            gain = error(sensitivity, c, assign[c]) - error(sensitivity, c, cands[i + 1])
            if gain <= 0 or not fits(current + extra):
                continue
            key = (-gain / max(extra, 1), extra, c)
            if best is None or key < best[0]:
                best = (key, c, cands[i + 1], extra)
        if best is None:
            break
        assign[best[1]] = best[2]
        current += best[3]
    return assign, met


@dataclass
class StagePlan:
    """One pipeline stage as the balancer sees it."""

    units: list[Unit]
    """Saved tensors per micro-batch, with their current bits and whether they are pinned."""
    fixed_bytes: int
    """Bytes per micro-batch of tensors that are never quantized."""
    holds: int
    """Micro-batches this stage holds at its peak (``pipeline_holds``)."""
    sensitivity: Sensitivity
    """This stage's measured per-class error."""

    def peak(self, scale_bytes: int, bits: dict[tuple[str, str], int] | None = None) -> int:
        """Peak stored bytes: ``holds`` micro-batches at the current (or the given) bits."""
        bits = bits or {}
        per_mb = self.fixed_bytes + sum(u.nbytes(bits.get((u.module, u.cls), u.bits), scale_bytes) for u in self.units)
        return self.holds * per_mb


def balance_stages(
    plans: dict[int, StagePlan],
    *,
    tolerance: float,
    min_bits: int,
    scale_bytes: int,
    ladder: tuple[int, ...] = (2, 4, 8, 16),
) -> tuple[dict[int, dict[tuple[str, str], int]], dict[int, int], dict[int, int]]:
    """Lower bits on the stages whose peak stored bytes exceed the lightest stage's by more than
    ``tolerance``, one (module, class) unit at a time (least error per byte saved first, never below
    ``min_bits`` nor below the lightest stage's peak), until every stage is within tolerance.

    Returns (per stage: the changed (module, class) -> bits, peaks before, peaks after).
    """
    steps = [b for b in ladder if b >= min_bits]
    before = {s: p.peak(scale_bytes) for s, p in plans.items()}
    floor = min(before.values())
    target = floor * (1 + tolerance)
    changed: dict[int, dict[tuple[str, str], int]] = {}
    after: dict[int, int] = {}
    for s in sorted(plans):
        plan, peak = plans[s], before[s]
        original = {(u.module, u.cls): u.bits for u in plan.units}
        bits = dict(original)
        while peak > target:
            moves = []
            for u in plan.units:
                key = (u.module, u.cls)
                lower = [b for b in steps if b < bits[key]]
                if u.pinned or not lower:
                    continue
                saved = plan.holds * (u.nbytes(bits[key], scale_bytes) - u.nbytes(lower[-1], scale_bytes))
                if saved <= 0:
                    continue
                cost = error(plan.sensitivity, u.cls, lower[-1]) - error(plan.sensitivity, u.cls, bits[key])
                moves.append((cost / saved, -saved, u.module, u.cls, lower[-1], saved))
            if not moves:
                break
            moves.sort()
            fitting = [m for m in moves if peak - m[5] >= floor]
            move = fitting[0] if fitting else min(moves, key=lambda m: (m[5], m[0]))
            bits[(move[2], move[3])] = move[4]
            peak -= move[5]
        changed[s] = {k: b for k, b in bits.items() if b != original[k]}
        after[s] = peak
    return changed, before, after


def spread(peaks: dict[int, int]) -> float:
    """Relative spread of per-stage peaks: ``max / min - 1``."""
    lo = min(peaks.values())
    return max(peaks.values()) / lo - 1 if lo > 0 else 0.0
