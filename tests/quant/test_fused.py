"""The fused in-place accumulation ops (csrc/cpu/agoq_accumulate.h) against their definition.

``dequantize_add_`` and ``requantize_add_`` are defined as compositions of ``dequantize`` and
``quantize``; the fused C++ kernels must give bit-identical codes, scales and sums, including
stochastic rounding (same draws for the same seed), partial last groups, bf16 addends and
non-finite groups, with the explicit SIMD loops on and off. The int8 accumulator built on them must
match the same accumulator run through the unfused pure-torch path.
"""

from __future__ import annotations

import pytest
import torch

from agoq_ds.gradient.accumulator import Int8Accumulator
from agoq_ds.quant import backends, dequantize, quantize
from agoq_ds.quant.fused import dequantize_add_, requantize_add_


@pytest.fixture(params=[True, False], ids=["simd", "generic"])
def simd(request, cpp):
    previous = cpp._kernels().set_simd(request.param)
    yield request.param
    cpp._kernels().set_simd(previous)


def _values(n: int, seed: int, nonfinite: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-3, 2, n).roll(seed)
    if nonfinite and n > 300:
        x[5] = float("nan")
        x[260] = float("inf")
    return x


@pytest.mark.parametrize("n", [1, 127, 128, 1000, 70_001])
def test_dequantize_add_matches_out_plus_dequantize(cpp, simd, n: int) -> None:
    q = quantize(_values(n, 1, nonfinite=True), 8, 128, backend="cpp")
    out = _values(n, 2)
    expected = out + dequantize(q, backend="cpp")
    dequantize_add_(out, q, backend="cpp")
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("n", [1, 200, 4096, 70_001])
@pytest.mark.parametrize("has_value", [True, False])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_requantize_add_matches_quantize_of_dequantize_plus_addend(
    cpp, simd, n: int, has_value: bool, stochastic: bool, dtype: torch.dtype
) -> None:
    group = 64 if n == 200 else 128
    start = quantize(_values(n, 3, nonfinite=True), 8, group, backend="cpp")
    addend = _values(n, 4).to(dtype)
    base = dequantize(start, backend="cpp") if has_value else torch.zeros(n)
    expected = quantize(base + addend.float(), 8, group, stochastic=stochastic, seed=99, backend="cpp")
    codes, scales = start.codes.clone(), start.scales.clone()
    requantize_add_(
        codes, scales, addend, has_value=has_value, group_size=group, stochastic=stochastic, seed=99, backend="cpp"
    )
    assert torch.equal(codes, expected.codes)
    torch.testing.assert_close(scales, expected.scales, rtol=0, atol=0, equal_nan=True)
    if has_value and n > 300:
        assert scales[0].isnan() and scales[2].isnan(), "a non-finite group must stay NaN"


def test_requantize_add_rejects_mismatched_buffers(cpp) -> None:
    codes, scales = torch.zeros(256, dtype=torch.int8), torch.zeros(2)
    with pytest.raises(ValueError, match="256 codes for an addend of 255"):
        requantize_add_(codes, scales, torch.zeros(255), has_value=False, group_size=128, stochastic=False, seed=0)
    with pytest.raises(RuntimeError, match="scales must be a contiguous CPU float32 tensor of 2"):
        requantize_add_(
            codes, torch.zeros(3), torch.zeros(256), has_value=False, group_size=128, stochastic=False, seed=0
        )


def _run_accumulator(pieces: list[tuple[int, int]], numel: int) -> Int8Accumulator:
    acc = Int8Accumulator(numel, 128, stochastic=False, error_feedback=False)
    for step in range(4):
        values = torch.cat([_values(n, 10 * step + k) for k, (_, n) in enumerate(pieces)])
        acc.add_(values, pieces, seed=step)
    return acc


@pytest.mark.parametrize(
    "pieces",
    [
        [(0, 5000)],  # one piece covering everything (the ZeRO-2 owned partition)
        [(0, 1000), (1000, 3000), (4000, 1000)],  # consecutive pieces: a view, no copy
        [(3, 100), (700, 2000), (2800, 2200)],  # gaps and unaligned starts
        [(4000, 1000), (0, 1000)],  # out of order
    ],
)
def test_fused_accumulator_matches_the_unfused_path(cpp, pieces: list[tuple[int, int]]) -> None:
    fused = _run_accumulator(pieces, 5000)
    previous = backends.preferred()
    backends.set_preferred("torch")  # round-to-nearest is bit-exact between cpp and the reference
    try:
        unfused = _run_accumulator(pieces, 5000)
    finally:
        backends.set_preferred(previous)
    assert torch.equal(fused.codes, unfused.codes)
    assert torch.equal(fused.scales, unfused.scales)


@pytest.mark.parametrize("has_value", [False, True])
def test_unfused_requantize_works_in_bounded_chunks(monkeypatch, has_value: bool) -> None:
    """Where no fused kernel runs (a GPU) the span is requantized chunk by chunk, so its fp32
    temporaries stay bounded; round-to-nearest results are those of the whole span at once (groups
    are independent), and every chunk is written."""
    from agoq_ds.quant import fused

    n, group = 1000 * 64 + 17, 64
    base = quantize(_values(n, 3), 8, group)
    addend = _values(n, 4)
    want_codes, want_scales = base.codes.clone(), base.scales.clone()
    requantize_add_(
        want_codes,
        want_scales,
        addend,
        has_value=has_value,
        group_size=group,
        stochastic=False,
        seed=0,
        backend="torch",
    )
    monkeypatch.setattr(fused, "FALLBACK_CHUNK", 10 * group + 5)  # not a multiple of the group: aligned down
    sizes = []
    real = fused.quantize
    monkeypatch.setattr(fused, "quantize", lambda x, *a, **k: sizes.append(x.numel()) or real(x, *a, **k))
    codes, scales = base.codes.clone(), base.scales.clone()
    requantize_add_(
        codes, scales, addend, has_value=has_value, group_size=group, stochastic=False, seed=0, backend="torch"
    )
    assert max(sizes) == 10 * group and sum(sizes) == n
    assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)
