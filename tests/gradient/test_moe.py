"""DeepSpeed MoE layers with 8-bit gradients at ZeRO-1 and ZeRO-2 (4 gloo ranks, expert parallel 2).

DeepSpeed reduces an expert's gradient over its expert-data-parallel group (the ranks holding the
same expert), the dense gradients over the data-parallel group, buckets mixing both. agoq reduces
each param group's slices over its own group (``layout.reduction_groups``). Checked against stock
DeepSpeed's update of every parameter after one step (2 micro-batches, SGD at lr 1):

* **exact**: with ``gradient.min_numel`` above every bucket, agoq's own reduce-scatter and partition
  store run in fp32, so the updates equal stock's up to the order of fp32 sums (8 terms; at most
  ``2^-16`` of the largest update). Reducing the expert gradients over the data-parallel group instead
  (the single-group reduction) is 11.5% of the largest update off here;
* **8 bits**: within the 8-bit path's bound, ``q S (1 + q/127) / 127`` with ``q = K (N + 1)`` quantizations
  per element (``K`` micro-batches, ``N`` ranks) and ``S`` the largest sum of the contributions'
  magnitudes, measured on stock's run (``tests/gradient/parity_workers.update_bound``).
"""

from __future__ import annotations

import pytest

from agoq_ds.testing.distributed import run_ranks
from tests.gradient.moe_workers import GA, world4

pytestmark = pytest.mark.slow

WORLD = 4


@pytest.fixture(scope="module")
def ws4() -> list[dict]:
    return run_ranks(world4, WORLD, (), timeout=1200)


@pytest.mark.parametrize("stage", [1, 2])
def test_moe_expert_gradients_reduce_over_their_groups(ws4: list[dict], stage: int) -> None:
    q = GA * (WORLD + 1)
    for rank, result in enumerate(ws4):
        row = result[stage]
        assert any(row["expert"].values()) and not all(row["expert"].values())
        exact, eight = row["exact"], row["8bit"]
        assert exact["optimizer"] == eight["optimizer"] == "AgoqZeroOptimizer"
        assert set(exact["paths"].values()) == {"exact"} and set(eight["paths"].values()) == {"8bit"}
        for name, error in exact["error"].items():
            assert error <= 2.0**-16, (rank, name, error)
        bound = q * row["magnitude"] * (1 + q / 127) / 127
        for name, error in eight["error"].items():
            assert error <= bound, (rank, name, error, bound)


def test_moe_at_stage0_takes_deepspeeds_path_or_is_refused_by_name() -> None:
    """At ZeRO-0 (DeepSpeed 0.19.8 refuses native MoE at ZeRO-3 itself) the default block leaves the
    gradients to DeepSpeed, which all-reduces experts over their groups; an explicit request is refused."""
    from tests.gradient.moe_workers import outside_zero12

    fallback = run_ranks(outside_zero12, 2, (0, False), timeout=600)
    assert fallback == ["none", "none"], fallback
    refused = run_ranks(outside_zero12, 2, (0, True), timeout=600)
    assert all("MoE layers" in r and "outside ZeRO stage 1 and 2" in r for r in refused), refused


def test_moe_with_the_all_reduce_path_is_refused() -> None:
    from agoq_ds.deepspeed.unsupported import UnsupportedConfigError, check_moe

    check_moe(2, reduce_scatter=True)
    with pytest.raises(UnsupportedConfigError, match="reduce_scatter=false"):
        check_moe(1, reduce_scatter=False)
