"""GradientStore: the lifecycle every 8-bit gradient host shares (single process, no collectives)."""

from __future__ import annotations

import torch

from agoq_ds.config import parse_agoq_config
from agoq_ds.gradient.store import STATE_VERSION, GradientStore


def _store(**gradient) -> GradientStore:
    config = parse_agoq_config({"gradient": {"min_numel": 0, "error_feedback": True, **gradient}})
    store = GradientStore(config, host="zero3", rank=0, world_size=2, device="cpu")
    store.add_per_step("partition", 300)
    store.add_carried(0, 200)
    return store


def _fill(store: GradientStore) -> None:
    gen = torch.Generator().manual_seed(0)
    store.step_accumulator("partition").add_(torch.randn(300, generator=gen), seed=store.seed(1))
    store.fold_accumulator(0).add_(torch.randn(200, generator=gen), seed=store.seed(2))


def test_state_round_trip_restores_residuals_and_step() -> None:
    store = _store()
    _fill(store)
    store.finish_step(overflow=False)
    state = store.state(stage=3, numel=300)
    assert store.step_accumulator("partition").has_value is False  # per-step values end with the step
    assert store.fold_accumulator(0).has_value  # the host empties carried accumulators itself

    fresh = _store()
    assert fresh.mismatch(state, stage=3, numel=300) is None
    assert fresh.load_state(state, stage=3, numel=300)
    assert fresh.step == 1
    for key in ("partition",):
        assert torch.equal(fresh.step_accumulator(key).residual(), store.step_accumulator(key).residual())
    assert torch.count_nonzero(fresh.step_accumulator("partition").residual()) > 0


def test_other_layouts_and_versions_start_from_zero_and_say_why() -> None:
    store = _store()
    _fill(store)
    store.finish_step(overflow=False)
    state = store.state(stage=3, numel=300)

    wider = GradientStore(store.config, host="zero3", rank=0, world_size=4, device="cpu")
    assert "world_size 2 (here 4)" in wider.mismatch(state, stage=3, numel=300)
    fresh = _store()
    _fill(fresh)
    assert "numel 300 (here 301)" in fresh.mismatch(state, stage=3, numel=301)
    assert not fresh.load_state(state, stage=3, numel=301)
    assert torch.count_nonzero(fresh.step_accumulator("partition").residual()) == 0

    old = {**state, "version": STATE_VERSION - 1}
    assert "another agoq-ds version" in fresh.mismatch(old, stage=3, numel=300)
    assert not fresh.load_state(old, stage=3, numel=300)


def test_overflow_drops_values_and_residuals_and_seeds_move_on() -> None:
    store = _store()
    first = store.seed(1)
    _fill(store)
    store.finish_step(overflow=True)
    assert not store.pending()
    assert all(torch.count_nonzero(a.residual()) == 0 for a in store.accumulators())
    assert store.seed(1) != first  # another step: another stochastic-rounding stream
