"""Notice when training runs into a wall: gradients that overflow step after step."""

from __future__ import annotations

OVERFLOW_STREAK = 3
"""Consecutive overflowing optimizer steps after which the engine says so (stock DeepSpeed skips
such steps quietly, or lowers an fp16 loss scale, and a run can go on skipping for ever)."""


class OverflowStreak:
    """Counts consecutive optimizer steps whose gradients overflowed (NaN/Inf, skipped step)."""

    def __init__(self, threshold: int = OVERFLOW_STREAK) -> None:
        self.threshold = threshold
        """Streak length that is reported."""
        self.streak = 0
        """Current run of overflowing steps."""

    def update(self, overflow: bool) -> bool:
        """Record one step; True exactly when the streak reaches ``threshold`` (once per streak)."""
        self.streak = self.streak + 1 if overflow else 0
        return self.streak == self.threshold


def overflow_message(steps: int, activation_bits: str) -> str:
    """What the engine logs when ``steps`` consecutive steps overflowed with agoq's activation storage on."""
    return (
        f"agoq: gradients overflowed (NaN/Inf) in {steps} consecutive optimizer steps with quantized "
        f'activation storage ({activation_bits}). If the same run without the "agoq" block does not '
        "overflow, the stored activations are too coarse for this model: raise activation.default_bits "
        'or the sensitive classes\' bits (activation.class_bits), or use policy "agoq" instead of "uniform".'
    )
