"""Int8 gradient accumulation versus fp32 accumulation (single process).

Derivation of the bounds checked here (per element, group g of ``group_size`` elements, partial
sums ``S_k = g_1 + ... + g_k``, ``a_k = absmax_g(S_k)``, quantization step ``s = absmax / 127``):

* Error feedback, round-to-nearest: ``x_k = D(A_{k-1}) + D(R_{k-1}) + g_k``, ``A_k = Q(x_k)``,
  ``r_k = x_k - D(A_k)``, ``R_k = Q(r_k)``, ``e_k = r_k - D(R_k)``. Telescoping gives
  ``D(A_K) = S_K - r_K - sum_{k<K} e_k`` and ``x_k = S_k - sum_{j<k} e_j``. With
  ``|r_k| <= absmax_g(x_k) / 254`` and ``|e_k| <= absmax_g(r_k) / 254``:
  ``|D(A_K) - S_K| <= M / 254 * (1 + (K - 1) / 254)``, ``M = max_k absmax_g(x_k)`` — independent
  of K up to the tiny second term.
* No error feedback, round-to-nearest: every requantization adds up to ``absmax_g(x_k) / 254`` and
  ``x_k = S_k + err_{k-1}``: ``E_k = E_{k-1} + (a_k + E_{k-1}) / 254`` — linear in K.
* Stochastic rounding: the same with a full step (``/ 127``) per rounding.
"""

from __future__ import annotations

import io

import pytest
import torch

from agoq_ds.gradient.accumulator import Fp32Accumulator, Int8Accumulator
from agoq_ds.quant import dequantize, quantize

G = 128
SLACK = 1 + 2.0**-18  # fp32 arithmetic in dequantize/add


def _grads(k: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    """Micro-batch gradients: a shared direction (so partial sums grow) plus noise, heavy-tailed."""
    gen = torch.Generator().manual_seed(seed)
    profile = torch.exp(torch.randn(n, generator=gen))
    common = torch.randn(n, generator=gen) * profile
    return [common + 0.7 * torch.randn(n, generator=gen) * profile for _ in range(k)]


def _group_absmax(x: torch.Tensor) -> torch.Tensor:
    n = x.numel()
    pad = -n % G
    groups = torch.nn.functional.pad(x.abs(), (0, pad)).view(-1, G)
    return groups.amax(dim=1).repeat_interleave(G)[:n]


def _partial_sums(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    sums, total = [], torch.zeros_like(grads[0], dtype=torch.float64)
    for g in grads:
        total = total + g.double()
        sums.append(total.clone())
    return sums


def _bound(grads: list[torch.Tensor], error_feedback: bool, stochastic: bool) -> torch.Tensor:
    sums = _partial_sums(grads)
    k = len(grads)
    step = 127.0 if stochastic else 254.0  # one full step or half a step per rounding
    if error_feedback:
        m = torch.stack([_group_absmax(s) for s in sums]).amax(dim=0) * (1 + k / 60000)
        return m / step * (1 + (k - 1) / step) * SLACK
    e = torch.zeros_like(sums[0])
    for s in sums:
        a = _group_absmax(s)
        e = e + (a + _group_absmax(e)) / step
    return e * SLACK


@pytest.mark.parametrize("k", [1, 8, 32])
@pytest.mark.parametrize(("error_feedback", "stochastic"), [(True, False), (False, False), (False, True), (True, True)])
def test_accumulated_error_within_derived_bound(k: int, error_feedback: bool, stochastic: bool) -> None:
    n = 5 * G + 37  # a short last group
    grads = _grads(k, n)
    acc = Int8Accumulator(n, G, stochastic=stochastic, error_feedback=error_feedback)
    for i, g in enumerate(grads):
        acc.add_(g, seed=i)
    exact = _partial_sums(grads)[-1]
    err = (acc.dequantize().double() - exact).abs()
    bound = _bound(grads, error_feedback, stochastic)
    if stochastic and error_feedback:
        bound = bound * 2  # stochastic residual rounding: a full residual step as well
    assert torch.all(err <= bound), float((err / bound).max())
    if error_feedback:
        # K micro-batches cost about what quantizing the fp32 sum once costs.
        once = quantize(exact.float(), 8, G, stochastic=stochastic)
        rel_once = float((dequantize(once).double() - exact).norm() / exact.norm())
        rel = float(err.norm() / exact.norm())
        assert rel <= (1.25 if not stochastic else 2.5) * rel_once, (rel, rel_once)


def _rel_error(k: int, error_feedback: bool) -> float:
    grads = _grads(k, 4 * G, seed=3)
    acc = Int8Accumulator(4 * G, G, error_feedback=error_feedback)
    for g in grads:
        acc.add_(g)
    exact = _partial_sums(grads)[-1]
    return float((acc.dequantize().double() - exact).norm() / exact.norm())


def test_error_feedback_keeps_error_flat_in_k() -> None:
    ef = _rel_error(32, True) / _rel_error(1, True)
    plain = _rel_error(32, False) / _rel_error(1, False)
    assert ef < 1.2, ef
    assert plain > 2.0, plain


def test_error_feedback_residual_carries_into_next_accumulation() -> None:
    n = 3 * G
    g1, g2 = _grads(2, n, seed=5)
    acc = Int8Accumulator(n, G, error_feedback=True)
    acc.add_(g1)
    first = acc.dequantize()
    residual = acc.residual()
    assert residual.abs().max() > 0
    # What the first step missed is handed to the next one.
    assert torch.allclose(first + residual, g1, atol=float(g1.abs().max()) / 127 / 250)
    acc.reset()
    acc.add_(g2)
    second = acc.dequantize()
    assert (first + second - (g1 + g2)).abs().max() <= float((g1 + g2).abs().max()) / 254 * 1.05 + 1e-6


def test_scattered_pieces_equal_dense_add() -> None:
    n = 6 * G + 5
    gen = torch.Generator().manual_seed(1)
    positions = [(700, 30), (3, 100), (130, 1), (400, 129), (768, 5)]
    values = torch.randn(sum(m for _, m in positions), generator=gen)
    dense = torch.zeros(n)
    start = 0
    for off, m in positions:
        dense[off : off + m] += values[start : start + m]
        start += m
    a = Int8Accumulator(n, G, error_feedback=False)
    a.add_(values, positions)
    b = Int8Accumulator(n, G, error_feedback=False)
    b.add_(dense)
    assert torch.equal(a.dequantize(), b.dequantize())
    f = Fp32Accumulator(n)
    f.add_(values, positions)
    assert torch.equal(f.dequantize(), dense)


def test_non_finite_groups_stay_nan_and_residual_stays_clean() -> None:
    n = 3 * G
    x = torch.randn(n)
    x[G + 5] = float("inf")
    acc = Int8Accumulator(n, G, error_feedback=True)
    acc.add_(x)
    out = acc.dequantize()
    assert torch.isnan(out[G : 2 * G]).all()
    assert torch.isfinite(out[:G]).all() and torch.isfinite(out[2 * G :]).all()
    assert torch.isfinite(acc.residual()).all()
    acc.add_(torch.randn(n))
    assert torch.isnan(acc.dequantize()[G : 2 * G]).all()


def test_storage_bytes_and_residual_state_round_trip() -> None:
    n = 10 * G + 1
    acc = Int8Accumulator(n, G, error_feedback=True)
    assert acc.nbytes == 0
    acc.add_(torch.randn(n))
    assert acc.nbytes == n + 4 * 11
    assert acc.nbytes / (4 * n) <= 0.27
    buf = io.BytesIO()
    torch.save(acc.residual_state(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = Int8Accumulator(n, G, error_feedback=True)
    assert other.load_residual_state(state)
    assert torch.equal(other.residual(), acc.residual())
    wrong = Int8Accumulator(n + 1, G, error_feedback=True)
    assert not wrong.load_residual_state(state)
    assert torch.count_nonzero(wrong.residual()) == 0


def test_dequantize_range_matches_the_whole() -> None:
    from agoq_ds.gradient.allreduce import chunk_bounds

    n = 7 * G + 5
    acc = Int8Accumulator(n, G, error_feedback=False)
    assert torch.equal(acc.dequantize_range(G, 3 * G), torch.zeros(2 * G))
    acc.add_(torch.randn(n))
    whole = acc.dequantize()
    bounds = chunk_bounds(n, 3 * G + 1, G)  # chunk size rounded down to whole groups
    assert bounds == [(0, 3 * G), (3 * G, 6 * G), (6 * G, n)]
    assert torch.equal(torch.cat([acc.dequantize_range(a, b) for a, b in bounds]), whole)
    with pytest.raises(ValueError, match="group-aligned"):
        acc.dequantize_range(1, G)
    dense = Fp32Accumulator(n)
    dense.add_(whole)
    assert torch.equal(dense.dequantize_range(G, 2 * G), whole[G : 2 * G])


@pytest.mark.parametrize("error_feedback", [False, True])
def test_release_on_reset_frees_the_value_and_starts_fresh(error_feedback: bool) -> None:
    """A step-scoped store (ZeRO-2's partition) holds nothing between steps, like stock DeepSpeed, and
    accumulates after the release exactly as a store that zeroed its buffer does."""
    gen = torch.Generator().manual_seed(3)
    steps = [[torch.randn(1000, generator=gen) for _ in range(3)] for _ in range(2)]
    released = Int8Accumulator(1000, 128, error_feedback=error_feedback, release_on_reset=True)
    kept = Int8Accumulator(1000, 128, error_feedback=error_feedback)
    for step in steps:
        for acc in (released, kept):
            for k, g in enumerate(step):
                acc.add_(g, seed=k)
        assert torch.equal(released.dequantize(), kept.dequantize())
        for acc in (released, kept):
            acc.reset()
        assert released.nbytes == 0 and kept.nbytes == 1000 + 4 * 8
        assert released.residual_nbytes == kept.residual_nbytes  # the residual carries on in both


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_take_hands_over_the_value_and_empties_the_accumulator(kind: str) -> None:
    """``take`` is what the hosts use to move an accumulated gradient into ``param.grad``: the value
    must survive the accumulator being emptied and refilled. (An fp32 accumulator's ``dequantize`` is
    its buffer; emptying it after ``dequantize`` zeroed every gradient below ``min_numel``.)"""
    acc = Fp32Accumulator(5) if kind == "fp32" else Int8Accumulator(256, 128, error_feedback=False)
    values = torch.arange(1, acc.numel + 1, dtype=torch.float32)
    acc.add_(values)
    taken = acc.take()
    assert not acc.has_value
    acc.add_(torch.full_like(values, 1000.0))
    acc.reset()
    tol = 0 if kind == "fp32" else float(values.abs().max()) / 254
    assert torch.allclose(taken, values, atol=tol, rtol=0), taken
    assert torch.count_nonzero(acc.take()) == 0
