"""A run whose gradients overflow step after step with quantized activations says so, once per streak."""

from __future__ import annotations

import pytest

from agoq_ds.overflow_watch import OVERFLOW_STREAK, OverflowStreak, overflow_message


def test_reports_once_when_a_streak_reaches_the_threshold() -> None:
    watch = OverflowStreak()
    steps = [True, True, False, True, True, True, True, True, False, True, True, True]
    reported = [i for i, overflow in enumerate(steps) if watch.update(overflow)]
    assert OVERFLOW_STREAK == 3
    assert reported == [5, 11]  # the third step of each unbroken streak, not every step after it


def test_message_names_the_bits_and_the_remedy() -> None:
    message = overflow_message(3, "bits per class: attn_core 4")
    assert "3 consecutive optimizer steps" in message and "attn_core 4" in message
    assert "activation.default_bits" in message and "uniform" in message


@pytest.mark.slow
def test_engine_logs_an_overflow_streak_once() -> None:
    from agoq_ds.testing.distributed import run_ranks
    from tests.integration.engine_workers import overflow_streak_warnings

    warned = run_ranks(overflow_streak_warnings, 2, (range(1, 5), 6))
    assert warned == [1, 1]  # four overflowing steps in a row: reported at the third, once
