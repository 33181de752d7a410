"""Small gradients travel and rest exact (``gradient.min_numel``): quantizing a few elements saves
nothing, and DeepSpeed's own tests of 2-4 element gradients expect them unrounded."""

from __future__ import annotations

import pytest

from agoq_ds.config import GradientConfig
from agoq_ds.gradient.accumulator import Fp32Accumulator, Int8Accumulator, gradient_accumulator
from agoq_ds.testing.distributed import run_ranks
from tests.gradient import grad_workers as w


def test_accumulator_below_min_numel_is_fp32() -> None:
    config = GradientConfig()
    assert isinstance(gradient_accumulator(config.min_numel - 1, config), Fp32Accumulator)
    assert isinstance(gradient_accumulator(config.min_numel, config), Int8Accumulator)
    assert isinstance(gradient_accumulator(3, GradientConfig(min_numel=0)), Int8Accumulator)


@pytest.mark.parametrize("world", [2, 3])
def test_few_element_reductions_are_exact_and_training_matches_stock(world: int) -> None:
    for rank, r in enumerate(run_ranks(w.small_gradient_checks, world)):
        # fp32 sums (in another order than the reference's): a few ulps, not 8-bit rounding.
        assert r["allreduce_exact"] < 1e-6 and r["reduce_scatter_exact"] < 1e-6, (rank, r)
        # The 8-bit path on the same values rounds them: the exact path is what made the difference.
        assert r["allreduce_int8"] > 1e-4, (rank, r)
        assert r["engine_moved"] > 1e-3  # the weights really trained
        assert r["engine_max_diff"] < 1e-5, (rank, r)


def test_single_rank_reduction_copies_nothing() -> None:
    """One GPU, ZeRO-2: the bucket's values go to the int8 store as they are (two full-size fp32
    copies of a 5e8-element bucket were 4 GB of transient memory)."""
    (result,) = run_ranks(w.single_rank_reduce, 1)
    assert result == {"view": True, "scaled": True}
