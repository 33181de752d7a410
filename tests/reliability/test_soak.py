"""Long runs: a bounded soak with gradient accumulation, and determinism of the seeded rounding.

The tiny LLaMA trains on 2 gloo ranks with ZeRO-2 and ``rel_workers.AGOQ`` (stochastic rounding of
activations and gradients, error feedback) for ``AGOQ_SOAK_STEPS`` optimizer steps (default
``SOAK_STEPS``; CI runs the default, set e.g. ``AGOQ_SOAK_STEPS=2000`` for a long soak) of ``GA``
micro-batches. Checked:

* stored-activation bytes are exactly 0 after every backward, and the per-step peak never changes;
* the gradient buffers (int8 codes, scales, error-feedback residuals) hold the same bytes every step;
* the number of live tensors is the same at every sample after warm-up (an exact leak check);
* process RSS after warm-up stays within ``RSS_TOLERANCE`` -- smaller than half of what leaking one
  micro-batch's unquantized activations per micro-step would add over the run (the check has power);
* the loss goes down;
* another seed gives other losses (the rounding is live); bit-identical losses for the same seed in
  separate processes are test_faults.py's (a fresh engine in the *same* process after the soak is
  recorded as a known issue, see the xfail below).
"""

from __future__ import annotations

import os

import pytest

from agoq_ds.testing.distributed import run_ranks
from tests.reliability import rel_workers as rw

SOAK_STEPS = 60
"""Optimizer steps of the CI soak (GA micro-batches each)."""
GA = 4
RERUN = 3
"""Optimizer steps rerun for the same-seed / other-seed comparison."""
RSS_TOLERANCE = 16 * 2**20
"""Allowed RSS growth between the end of warm-up and the end of the soak (bytes)."""

STEPS = int(os.environ.get("AGOQ_SOAK_STEPS", SOAK_STEPS))
WARMUP = max(5, STEPS // 10)
SAMPLE_EVERY = max(1, STEPS // 20)

pytestmark = [pytest.mark.slow, pytest.mark.soak]


@pytest.fixture(scope="module")
def soaked() -> list[dict]:
    return run_ranks(rw.soak_and_determinism, 2, (STEPS, GA, SAMPLE_EVERY, RERUN), timeout=max(600, STEPS * 10))


def test_stored_activations_return_to_zero_after_every_backward(soaked: list[dict]) -> None:
    for result in soaked:
        soak = result["soak"]
        assert len(soak["after_backward"]) == STEPS * GA
        assert set(soak["after_backward"]) == {0}
        assert soak["stored_per_forward"] > 0  # activations were stored quantized in the first place
        # Step 0 traces the model (its activations are held unquantized until the forward returns).
        peaks = soak["stored_peaks"]
        assert peaks[0] > peaks[1] and len(set(peaks[1:])) == 1, peaks[:10]


def test_gradient_buffers_do_not_grow(soaked: list[dict]) -> None:
    for result in soaked:
        buffers = result["soak"]["buffers"]
        assert buffers[0] > 0 and len(set(buffers)) == 1, (buffers[0], max(buffers))


def test_live_tensors_and_rss_flat(soaked: list[dict]) -> None:
    for rank, result in enumerate(soaked):
        soak = result["soak"]
        after = [(step, rss, tensors) for step, rss, tensors in soak["samples"] if step >= WARMUP]
        assert len(after) >= 2, soak["samples"]
        assert len({tensors for _, _, tensors in after}) == 1, (rank, after)
        growth = after[-1][1] - after[0][1]
        measured_micro_steps = (after[-1][0] - after[0][0]) * GA
        leak = soak["baseline_per_forward"] * measured_micro_steps
        assert RSS_TOLERANCE * 2 < leak or STEPS < SOAK_STEPS, (RSS_TOLERANCE, leak)  # the check has power
        assert growth <= RSS_TOLERANCE, (rank, growth, after)
        print(
            f"\nrank {rank}: {STEPS} steps x {GA} micro-batches in {soak['seconds']:.0f} s, "
            f"RSS {after[0][1] / 2**20:.1f} -> {after[-1][1] / 2**20:.1f} MiB (growth {growth / 2**20:+.2f} MiB), "
            f"{after[-1][2]} live tensors"
        )


def test_it_learns(soaked: list[dict]) -> None:
    for result in soaked:
        losses = result["soak"]["losses"]
        k = max(GA, len(losses) // 10)
        assert sum(losses[-k:]) / k < sum(losses[:k]) / k - 0.5


def test_another_seed_gives_other_losses(soaked: list[dict]) -> None:
    for result in soaked:
        first = result["soak"]["losses"][: RERUN * GA]
        assert result["other_seed"][:GA] == first[:GA]  # the first forward passes precede any rounding
        assert result["other_seed"] != first


@pytest.mark.xfail(
    strict=False,
    reason="KNOWN ISSUE (reported, intermittent): an agoq run started in a process that already ran other "
    "DeepSpeed engines can differ from the same run in a fresh process (from the last bits up to 1e-3 of the "
    "loss); stock DeepSpeed under the same history does not. Runs in fresh processes are bit-identical "
    "(test_faults.py::test_same_seed_and_config_bit_identical_losses_across_processes).",
)
def test_same_seed_reproduces_in_a_fresh_engine_of_the_same_process(soaked: list[dict]) -> None:
    for result in soaked:
        assert result["same_seed"] == result["soak"]["losses"][: RERUN * GA]
