"""The runtime guard of issue 27: path counts in ``agoq_stats()`` and the start-up summary, and the
``agoq.gradient.check_steps`` debug check that raises, naming the parameter, when agoq's gradient is
zero where the exact one is not. (Its silence on correct gradients is checked by every case of
``test_gradient_parity.py``, which runs with the guard on.)"""

from __future__ import annotations

import pytest

from agoq_ds.config import AgoqConfigError, parse_agoq_config
from agoq_ds.testing.distributed import run_ranks
from tests.gradient import parity_workers as pw


@pytest.fixture(scope="module")
def guard() -> list[dict]:
    return run_ranks(pw.guard_checks, 2)


def test_path_counts_cover_every_trainable_parameter(guard: list[dict]) -> None:
    for result in guard:
        stats = result["stats"]
        assert stats["gradient/params_exact"] + stats["gradient/params_8bit"] == result["trainable"]
        # Stage 0 reduces all 3 401 elements in one bucket: above min_numel, so every parameter can be rounded.
        assert stats["gradient/params_8bit"] == result["trainable"]
    assert f"{guard[0]['trainable']} on the 8-bit path, 0 exact" in guard[0]["summary"]


def test_zeroed_small_gradient_raises_naming_the_parameter(guard: list[dict]) -> None:
    for result in guard:
        error = result["error"]
        assert error is not None and error.startswith("AgoqGradientError")
        # The broken hand-over drops what the fp32 accumulators folded (micro-batch 1 of 2): ``rare``,
        # used by that micro-batch only, is left with nothing. (``scale``/``small`` lose half their
        # gradient, not all of it: the parity suite's bound catches those.)
        assert "'0.rare': agoq's gradient is all zero" in error, error
        assert "'1.odd'" not in error  # int8-accumulated: unaffected


def test_check_steps_is_validated() -> None:
    assert parse_agoq_config({"gradient": {"check_steps": 3}}).gradient.check_steps == 3
    assert parse_agoq_config({}).gradient.check_steps == 0
    with pytest.raises(AgoqConfigError, match="check_steps"):
        parse_agoq_config({"gradient": {"check_steps": -1}})
