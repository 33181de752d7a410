"""The 8-bit gradient path rounds stochastically when configured to: its error averages out.

A loss curve cannot show this (round-to-nearest gradients give a trajectory inside the spread of
the rounding noise, see ``tests/golden/golden_loss.py``), so it is checked directly on two gloo
ranks: the mean over ``DRAWS`` seeds of the reduce-scatter's error, per element, in units of its
standard deviation bound (``grad_workers.rounding_bias``). For stochastic rounding the largest of
the 512 elements per rank stays below ``Z_MAX`` (a bound of 6 units: the per-draw error is bounded
by half a step, so Hoeffding gives P(|z| > 6) <= 2 exp(-18) per element); round-to-nearest, run the
same way, must exceed it (the test can fail).
"""

from __future__ import annotations

import pytest

from agoq_ds.testing.distributed import run_ranks
from tests.gradient.grad_workers import rounding_bias

pytestmark = pytest.mark.slow

DRAWS = 64
Z_MAX = 6.0


@pytest.mark.parametrize("stochastic", [True, False], ids=["stochastic", "nearest"])
def test_reduce_scatter_rounding_averages_out_only_when_stochastic(stochastic: bool) -> None:
    results = run_ranks(rounding_bias, 2, (DRAWS, stochastic))
    worst = max(r["max_z"] for r in results)
    if stochastic:
        assert worst < Z_MAX, f"stochastic rounding is biased: mean error {worst:.1f} standard deviations"
    else:
        assert worst > Z_MAX, f"round-to-nearest looks unbiased ({worst:.1f}): the statistic cannot see bias"
