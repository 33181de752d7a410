"""No copy of a whole gradient bucket on any rank count (issue 23, item 4).

A real DeepSpeed ZeRO-2 engine (gloo CPU ranks) with buckets of several parameters, which DeepSpeed
fills in backward order while ``deepspeed/layout.py`` lists each rank's slices in partition order:
concatenating them (``gather_slices`` -> ``torch.cat``) was a copy of the whole bucket on one rank.
A dispatch mode records the largest tensor any aten op creates inside the bucket reduction.
"""

from __future__ import annotations

import pytest

from agoq_ds.testing.distributed import run_ranks
from tests.gradient import bucket_copy_workers as bw

CHUNK = 2 * bw.GROUP
"""``accumulator.SPAN_CHUNK`` for the test: far below the bucket, so a bucket-sized temporary shows."""


def test_one_rank_allocates_at_most_one_chunk() -> None:
    (r,) = run_ranks(bw.reduce_largest_temporary, 1, (CHUNK,))
    assert r["slices"] >= 2 and r["buckets"] >= 2  # several params per bucket, several buckets
    assert r["bucket"] > 4 * CHUNK
    # Before: torch.cat of the bucket's slices (r["bucket"] elements, 2,710 here).
    assert r["largest"] <= CHUNK, (r["largest"], r["op"], r["bucket"])


def test_two_ranks_copy_no_whole_bucket() -> None:
    results = run_ranks(bw.reduce_largest_temporary, 2, (CHUNK,))
    for r in results:
        assert r["slices"] >= 2 and r["bucket"] > 4 * CHUNK
        # What is left on several ranks: one rank's share of the bucket in the reduce-scatter (the
        # packed segment sent: its int8 codes plus fp32 scales; the fp32 sum received), never the
        # whole bucket.
        packed = r["share"] + 4 * (-(-r["share"] // bw.GROUP)) + 4
        assert r["largest"] <= packed < r["bucket"], (r["largest"], r["op"], r["share"], r["bucket"])


@pytest.mark.parametrize("world", [1, 2])
def test_chunked_store_is_bit_identical(world: int) -> None:
    """Round-to-nearest: feeding the int8 store chunk by chunk gives the same weights, bit for bit,
    as one pass per span (the default chunk is larger than these buckets)."""
    chunked = run_ranks(bw.reduce_largest_temporary, world, (CHUNK,))
    whole = run_ranks(bw.reduce_largest_temporary, world, (None,))
    for a, b in zip(chunked, whole, strict=True):
        assert a["params"] == b["params"]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("round_elements", [None, CHUNK], ids=["one-round", "rounds"])
def test_planner_counts_the_reduction_temporaries(world: int, round_elements: int | None) -> None:
    """``agoq-ds plan`` charges each bucket reduction ``planner.reduction_working_set``: at least the live
    bytes it allocates beyond what it keeps, measured on CPU, and not a bound that could not fail (the
    largest reduction on a rank owning a share reaches half of it). With exchange rounds and store
    chunks far below the bucket, what remains is the rank's fp32 share."""
    results = run_ranks(bw.reduction_temporaries, world, (round_elements,))
    for rank, rows in enumerate(results):
        assert rows, rank
        for row in rows:
            assert row["temporaries"] <= row["planned"], (world, rank, row)
        owning = [r for r in rows if r["share"] > 0]
        assert max(r["temporaries"] / r["planned"] for r in owning) >= 0.5, (world, rank, owning)


@pytest.mark.parametrize(("stage", "world"), [(2, 2), (2, 3), (3, 2)])
def test_stored_by_round_matches_one_exchange(stage: int, world: int) -> None:
    """ZeRO-2/3 store the reduced share round by round (rounds of ``CHUNK`` elements here). The
    exchange's groups are the same, so a partition group differs from the one-exchange result only where
    a round boundary falls inside it and it is requantized twice: at most one such group per boundary,
    by at most two int8 steps (``2 absmax / 127``)."""
    one = run_ranks(bw.partition_after_reduction, world, (None, stage))
    rounds = run_ranks(bw.partition_after_reduction, world, (CHUNK, stage))
    for rank in range(world):
        a, b = one[rank], rounds[rank]
        assert len(a) == len(b) > 2 * CHUNK, rank
        differ = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        boundaries = len(a) // CHUNK
        assert len(differ) <= boundaries * bw.GROUP, (rank, len(differ))
        step = max(abs(x) for x in a) / 127
        assert all(abs(a[i] - b[i]) <= 2 * step for i in differ), rank
