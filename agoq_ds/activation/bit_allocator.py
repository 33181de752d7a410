"""Calibration and budget handling: which steps measure, and the bit-widths fixed after them.

In budget mode the first ``budget.calibration_steps`` steps store activations unquantized while
measuring each class's quantization error (``calibration.py``); in stage-aware pipeline mode step 1
measures at the class-table bits. At the end of those steps the allocators (``allocate.py``) fix the
bits: the budget table first, then per-stage balancing across the pipeline, and each decision is
logged and kept for the report and the checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .allocate import StagePlan, allocate_budget, balance_stages, spread
from .calibration import Calibration
from .policy import BitPolicy
from .storage import QuantSpec

if TYPE_CHECKING:
    from ..config import ActivationConfig


def _log(msg: str) -> None:
    from deepspeed.utils import logger

    logger.info(msg)


class BitAllocator:
    """Measures during the calibration steps and fixes the policy's bits after them."""

    def __init__(
        self,
        config: ActivationConfig,
        policy: BitPolicy,
        spec: QuantSpec,
        *,
        stage_id: int,
        num_stages: int,
        holds: int,
        process_group: Any = None,
    ) -> None:
        self.config, self.policy, self.spec = config, policy, spec
        self.stage_id, self.num_stages, self.holds, self.process_group = stage_id, num_stages, holds, process_group
        budget = config.budget
        self.budget = budget.target_avg_bits is not None or budget.stage_budget_bytes is not None
        """Budget mode: bits per class chosen from the measured errors (calibration stores unquantized)."""
        self.stage_aware = config.pipeline.mode == "stage_aware"
        """Stage-aware pipeline mode: per-stage peaks balanced after the first step."""
        self.steps = budget.calibration_steps if self.budget else 1 if self.stage_aware else 0
        """Steps that measure before the bits are fixed (0: nothing is calibrated)."""
        self.calibration: Calibration | None = Calibration(spec, [2, 4, 8]) if self.steps else None
        """Measurements in progress (``None`` once the bits are fixed or when nothing is calibrated)."""
        self.forwards = 0
        """Forwards measured so far."""
        self.sensitivity: dict[str, dict[int, float]] = {}
        """Measured relative quantization error per class and bits (after calibration)."""
        self.stage_peaks: dict[str, dict[int, int]] = {}
        """Stage-aware mode: modelled per-stage peak stored bytes ``before``/``after`` balancing."""
        self.decisions: list[str] = []
        """What the allocators decided, as logged."""

    @property
    def calibrated(self) -> bool:
        """The bits were fixed by a calibration (nothing is measured any more)."""
        return self.calibration is None and self.steps > 0

    def observe(self, t: torch.Tensor | None, cls: str, module: str, quantizable: bool, numel: int = 0) -> None:
        """The pack engine's observer of every finalised tensor while calibrating."""
        if self.calibration is not None:
            self.calibration.observe(t, cls, module, quantizable, numel)

    def end_step(self, step: int, forwards: int) -> bool:
        """A step of ``forwards`` forwards ended; True when the bits were fixed now."""
        if self.calibration is None:
            return False
        self.forwards += forwards
        if step >= self.steps and self.forwards:
            self._allocate()
            return True
        return False

    def finish(self) -> None:
        """Stop measuring (a restored checkpoint was calibrated already)."""
        self.calibration = None

    def _allocate(self) -> None:
        calib = self.calibration
        assert calib is not None
        units, fixed_numel, fixed_bytes = calib.per_micro_batch(self.forwards)
        recomputed = calib.recomputed
        self.sensitivity = calib.sensitivity()
        self.calibration = None
        scale_bytes = self.spec.scale_dtype.itemsize
        for u in units:
            pinned = self.policy.pinned_bits(u.module, u.cls)
            u.pinned = pinned is not None or (self.budget and self.policy.class_pinned(u.cls))
            u.bits = pinned if pinned is not None else self.policy.bits(u.module, u.cls)
        if self.budget:
            self._allocate_budget(units, fixed_numel, fixed_bytes, recomputed, scale_bytes)
        if self.stage_aware:
            self._balance_stages(units, fixed_bytes, scale_bytes)

    def _allocate_budget(
        self, units: list, fixed_numel: int, fixed_bytes: int, recomputed: set[str], scale_bytes: int
    ) -> None:
        b = self.config.budget
        table = allocate_budget(
            units,
            fixed_numel,
            fixed_bytes,
            self.sensitivity,
            list(b.candidate_bits),
            scale_bytes,
            target_avg_bits=b.target_avg_bits,
            budget_bytes=b.stage_budget_bytes,
            holds=self.holds,
            floors=self._sensitive_floors(),
        )
        # Classes whose tensors are all recomputed from other classes' follow their sources: at the
        # smallest width they never raise a source above what the budget gave it.
        stored = {u.cls for u in units}
        lowest = min(b.candidate_bits)
        table |= {c: lowest for c in recomputed - stored if not self.policy.class_pinned(c)}
        self.policy.set_class_bits(table)
        for u in units:
            if not u.pinned:
                u.bits = table[u.cls]
        nbytes = fixed_bytes + sum(u.nbytes(u.bits, scale_bytes) for u in units)
        numel = fixed_numel + sum(u.numel for u in units)
        self._decide(
            f"budget mode (stage {self.stage_id}): class bits {dict(sorted(table.items()))}; predicted "
            f"{8 * nbytes / max(numel, 1):.3f} bits/element, {self.holds * nbytes} bytes peak "
            f"(target avg {b.target_avg_bits}, stage budget {b.stage_budget_bytes}); "
            f"measured error {self._fmt_sensitivity(table)}"
        )

    def _balance_stages(self, units: list, fixed_bytes: int, scale_bytes: int) -> None:
        plans = self._gather(StagePlan(units, fixed_bytes, self.holds, self.sensitivity))
        pipeline = self.config.pipeline
        changed, before, after = balance_stages(
            plans, tolerance=pipeline.tolerance, min_bits=pipeline.min_bits, scale_bytes=scale_bytes
        )
        mine = changed.get(self.stage_id, {})
        self.policy.set_overrides(mine)
        self.stage_peaks = {"before": before, "after": after}
        self._decide(
            f"stage-aware (stage {self.stage_id}/{self.num_stages}, holds {self.holds} micro-batches): peak bytes "
            f"per stage {before} -> {after} (spread {spread(before):.1%} -> {spread(after):.1%}, tolerance "
            f"{pipeline.tolerance:.0%}); {len(mine)} unit(s) lowered on this stage"
            + (": " + ", ".join(f"{m}:{c}={b}" for (m, c), b in sorted(mine.items())) if mine else "")
        )

    def _sensitive_floors(self) -> dict[str, int]:
        """Classes the policy table singles out above ``default_bits`` (attention, head/loss): budget
        mode keeps them at least there while the budget allows, since quantization error alone
        understates how backward amplifies theirs (softmax)."""
        default = self.config.default_bits
        return {c: b for c, b in self.policy.base_table.items() if b > default}

    def _gather(self, plan: StagePlan) -> dict[int, StagePlan]:
        import torch.distributed as dist

        if self.num_stages <= 1 or not (dist.is_available() and dist.is_initialized()):
            return {self.stage_id: plan}
        gathered: list[Any] = [None] * dist.get_world_size(self.process_group)
        dist.all_gather_object(gathered, (self.stage_id, plan), group=self.process_group)
        plans: dict[int, StagePlan] = {}
        for stage, p in gathered:
            plans.setdefault(stage, p)
        return plans

    def _decide(self, message: str) -> None:
        self.decisions.append(message)
        _log("agoq activation " + message)

    def _fmt_sensitivity(self, table: dict[str, int]) -> str:
        parts = []
        for cls, bits in sorted(table.items()):
            err = self.sensitivity.get(cls, {}).get(bits)
            if err is not None:
                parts.append(f"{cls}@{bits}={err:.2e}")
        return ", ".join(parts)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the allocation (plain types)."""
        return {
            "calibrated": self.calibrated,
            "sensitivity": {c: {str(b): float(e) for b, e in v.items()} for c, v in self.sensitivity.items()},
            "stage_peaks": {k: {str(s): int(p) for s, p in v.items()} for k, v in self.stage_peaks.items()},
            "decisions": list(self.decisions),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (a calibrated allocation is not measured again)."""
        self.sensitivity = {c: {int(b): float(e) for b, e in v.items()} for c, v in state["sensitivity"].items()}
        self.stage_peaks = {k: {int(s): int(p) for s, p in v.items()} for k, v in state.get("stage_peaks", {}).items()}
        self.decisions = list(state.get("decisions", []))
        if state["calibrated"]:
            self.finish()
