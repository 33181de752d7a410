"""The blockwise quantizer's contract (format.py), checked on every backend that runs on this CPU.

Every expectation is derived from the format itself (error bounds from ``format.bound``, code
layouts written out by hand, statistics of stochastic rounding), never from another backend's
output; bit-for-bit agreement between backends is tested in test_cpp_backend.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from agoq_ds.quant import all_status, bound, dequantize, quantize, stochastic_bound
from agoq_ds.quant.format import TINY, QuantizedTensor, levels, num_groups, packed_bytes, qmax

CPU_BACKENDS = [s.name for s in all_status() if s.available and "cpu" in s.device_types]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Unit roundoff of each output dtype (dequantized values are rounded once more to it).
ROUNDOFF = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Smallest positive subnormal of each output dtype (absolute rounding error floor near zero).
SUBNORMAL = {torch.float32: 0.0, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}
SHAPES = [(0,), (1,), (3, 37), (1000,), (2, 3, 1031)]


def test_cpu_backends_include_reference() -> None:
    assert "torch" in CPU_BACKENDS


def _data(shape: tuple[int, ...], dtype: torch.dtype, symmetric: bool, seed: int = 0) -> torch.Tensor:
    """Values spanning several magnitudes per tensor (fp16-safe), one-signed for asymmetric."""
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    x = torch.randn(n, generator=gen) * torch.logspace(-2, 2, max(n, 1))[:n]
    if not symmetric:
        x = x.abs() + 0.5
    return x.reshape(shape).to(dtype)


def _per_element(q: QuantizedTensor, per_group: torch.Tensor) -> torch.Tensor:
    return per_group.repeat_interleave(q.group_size)[: q.numel].reshape(q.shape)


def _check_round_trip(x: torch.Tensor, q: QuantizedTensor, y: torch.Tensor, factor: float = 1.0) -> None:
    assert y.shape == x.shape and y.dtype == x.dtype
    limit = _per_element(q, bound(q) * factor)
    out = y.float()
    # The fp32 result is rounded once more to the output dtype.
    limit = limit + out.abs() * ROUNDOFF[x.dtype] * (1 + 2**-7) + SUBNORMAL[x.dtype]
    err = (out - x.float()).abs()
    assert torch.isfinite(err).all()
    worst = (err - limit).max().item() if err.numel() else 0.0
    assert worst <= 0, f"error exceeds the format bound by {worst:.3g}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [32, 256, 4096])
def test_round_trip_within_bound(backend: str, bits: int, symmetric: bool, dtype: torch.dtype, group_size: int) -> None:
    for i, shape in enumerate(SHAPES):
        x = _data(shape, dtype, symmetric, seed=i)
        q = quantize(x, bits, group_size, symmetric=symmetric, backend=backend)
        y = dequantize(q, backend=backend)
        _check_round_trip(x, q, y)
        if x.numel() == 0:
            continue
        # Round-to-nearest reaches the extreme code of every group: |q| = qmax at the absmax element
        # (symmetric), 0 and `levels` at the min and max (asymmetric).
        codes = _unpacked(q)

        live = q.scales.float() > 0  # a one-element asymmetric group has zero range and is flushed
        if symmetric:
            assert (_per_group(codes, group_size, 0).abs().amax(dim=1)[live] == qmax(bits)).all()
        else:
            assert (_per_group(codes, group_size, levels(bits)).amin(dim=1) == 0).all()
            assert (_per_group(codes, group_size, 0).amax(dim=1)[live] == levels(bits)).all()


def _per_group(codes: torch.Tensor, group_size: int, fill: int) -> torch.Tensor:
    """Codes as [groups, group_size], the last group padded with ``fill`` (chosen not to change the statistic)."""
    pad = num_groups(codes.numel(), group_size) * group_size - codes.numel()
    return torch.nn.functional.pad(codes, (0, pad), value=fill).view(-1, group_size)


def _unpacked(q: QuantizedTensor) -> torch.Tensor:
    """Signed (symmetric) or unsigned (asymmetric) integer codes, one per element, decoded by hand."""
    if q.bits == 8:
        return q.codes.to(torch.int64)
    per = 8 // q.bits
    parts = [(q.codes.to(torch.int64) >> (i * q.bits)) & ((1 << q.bits) - 1) for i in range(per)]
    codes = torch.stack(parts, dim=1).reshape(-1)[: q.numel]
    return codes - (2 ** (q.bits - 1) if q.symmetric else 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_code_layout_by_hand(backend: str) -> None:
    # absmax 7 -> scale 1 for 4-bit symmetric: q = x, stored as q + 8, two per byte, low nibble first.
    x = torch.tensor([-7.0, 7.0, 0.0, 1.0, -1.0, 3.0] + [0.0] * 26)
    q = quantize(x, 4, 32, backend=backend)
    assert q.scales.tolist() == [1.0]
    assert q.codes[:3].tolist() == [0xF1, 0x98, 0xB7]
    # 2-bit: absmax 1 -> scale 1; codes q + 2, four per byte, lowest bits first.
    x2 = torch.tensor([-1.0, 0.0, 1.0, 1.0, 1.0] + [0.0] * 27)
    q2 = quantize(x2, 2, 32, backend=backend)
    assert q2.codes[:2].tolist() == [0b11_11_10_01, 0b10_10_10_11]
    # 8-bit symmetric codes are the int8 values themselves.
    x8 = torch.tensor([127.0, -127.0, 5.0] + [0.0] * 29)
    assert quantize(x8, 8, 32, backend=backend).codes[:3].tolist() == [127, -127, 5]
    # Asymmetric 4-bit: min 2, max 17 -> scale 1, zero 2, codes x - 2; an odd count leaves the top nibble 0.
    xa = torch.tensor([2.0, 17.0, 3.0])
    qa = quantize(xa, 4, 32, symmetric=False, backend=backend)
    assert qa.zeros.tolist() == [2.0] and qa.scales.tolist() == [1.0]
    assert qa.codes.tolist() == [0xF0, 0x01]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize(
    ("symmetric", "scale_dtype"),
    [(True, torch.float32), (True, torch.bfloat16), (False, torch.float32)],
    ids=["sym-fp32", "sym-bf16", "asym-fp32"],
)
def test_sizes_and_dtypes(backend: str, bits: int, symmetric: bool, scale_dtype: torch.dtype) -> None:
    n, g = 1000, 128
    q = quantize(torch.randn(n), bits, g, symmetric=symmetric, scale_dtype=scale_dtype, backend=backend)
    assert q.codes.dtype == (torch.int8 if bits == 8 and symmetric else torch.uint8)
    assert q.codes.shape == (packed_bytes(n, bits),) == (math.ceil(n * bits / 8),)
    assert q.scales.dtype == scale_dtype and q.scales.shape == (8,)
    if symmetric:
        assert q.zeros is None
    else:
        assert q.zeros.dtype == torch.float32 and q.zeros.shape == (8,)
    scale_bytes = 8 * (2 if scale_dtype == torch.bfloat16 else 4) * (1 if symmetric else 2)
    assert q.nbytes == math.ceil(n * bits / 8) + scale_bytes
    assert q.bits_per_element == pytest.approx(8 * q.nbytes / n)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_groups(backend: str, bits: int, symmetric: bool, dtype: torch.dtype) -> None:
    g = 32
    x = _data((8 * g + 5,), torch.float32, symmetric, seed=1)
    x[0 * g + 3] = float("nan")
    x[1 * g + 7] = float("inf")
    x[2 * g + 31] = float("-inf")
    x[3 * g : 4 * g] = 0.0
    const = qmax(bits) / 8  # constant group: absmax / qmax = 1/8 exactly (symmetric), zero range (asymmetric)
    x[4 * g : 5 * g] = const
    tiny = dtype != torch.float16  # fp16 cannot hold values below TINY = 2**-100
    if tiny:
        x[5 * g : 6 * g] = torch.linspace(1, 2, g) * 2.0**-110
    x[8 * g + 2] = float("nan")  # the partial last group
    x = x.to(dtype)
    q = quantize(x, bits, g, symmetric=symmetric, backend=backend)
    y = dequantize(q, backend=backend).float()
    for k in (0, 1, 2, 8):
        assert torch.isnan(q.scales[k].float())
        assert torch.isnan(y[k * g : (k + 1) * g]).all(), f"non-finite group {k} must dequantize to NaN"
        if not symmetric:
            assert torch.isnan(q.zeros[k])
    zero_code = 2 ** (bits - 1) if symmetric and bits < 8 else 0
    assert (_unpacked(q)[: 3 * g] == 0).all(), "codes of non-finite groups must be q = 0"
    if bits < 8:
        per = 8 // bits
        assert q.codes[0].item() == sum(zero_code << (i * bits) for i in range(per))
    # All-zero group: exact zeros, scale 0.
    assert q.scales[3].item() == 0
    assert torch.equal(y[3 * g : 4 * g], torch.zeros(g))
    # Constant group: exact in both schemes (scale 1/8 exactly; a zero-range group dequantizes to its minimum).
    assert torch.equal(y[4 * g : 5 * g], torch.full((g,), const))
    if tiny:  # flushed: scale 0; symmetric -> 0, asymmetric -> its minimum, within TINY either way
        assert q.scales[5].item() == 0
        err = (y[5 * g : 6 * g] - x[5 * g : 6 * g].float()).abs()
        assert (err <= TINY).all()
    finite = [4, 6, 7] + ([5] if tiny else [])
    keep = torch.cat([torch.arange(k * g, (k + 1) * g) for k in finite])
    limit = _per_element(q, bound(q))[keep] * (1 + 2**-6) + y[keep].abs() * ROUNDOFF[dtype] + SUBNORMAL[dtype]
    assert ((y[keep] - x.float()[keep]).abs() <= limit).all()


def _stochastic_mean_error(
    backend: str, x: torch.Tensor, bits: int, symmetric: bool, stochastic: bool, seeds: int
) -> tuple[torch.Tensor, float]:
    """Mean over seeds of x' - x per element, and the step size s of the (single) group."""
    total = torch.zeros(x.numel(), dtype=torch.float64)
    step = None
    for seed in range(seeds):
        q = quantize(x, bits, 64, symmetric=symmetric, stochastic=stochastic, seed=seed, backend=backend)
        y = dequantize(q, backend=backend)
        _check_round_trip(x, q, y, factor=stochastic_bound(q)[0].item() / bound(q)[0].item())  # one full step
        step = q.scales.float().item()
        total += y.double() - x.double()
    return total / seeds, step


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_stochastic_rounding_unbiased(backend: str, bits: int, symmetric: bool, dtype: torch.dtype) -> None:
    # A group whose grid is exactly the integers (absmax = qmax, or min 0 and max = levels), and
    # every other value 0.3 of a step above a grid point: round-to-nearest is biased by -0.3 steps.
    top = qmax(bits) if symmetric else levels(bits)
    lo = -top if symmetric else 0
    grid = torch.arange(lo, top).double()
    vals = (grid.repeat(64)[:62] + 0.3).tolist()
    x = torch.tensor([float(top), float(lo), *vals]).to(dtype)
    seeds = 200
    mean_err, step = _stochastic_mean_error(backend, x, bits, symmetric, True, seeds)
    assert step == 1.0
    frac = (x.double() - x.double().floor()).clamp(0, 1)
    # x' - x is s * (Bernoulli(frac) - frac): mean 0, variance s^2 frac (1 - frac) <= s^2 / 4.
    sigma_elem = step * torch.sqrt(frac * (1 - frac) / seeds)
    assert (mean_err.abs() <= 6 * sigma_elem + 1e-12).all(), f"max |bias| {mean_err.abs().max():.3g}"
    sigma_all = step * math.sqrt((frac * (1 - frac)).mean().item() / (seeds * x.numel()))
    assert abs(mean_err.mean().item()) <= 6 * sigma_all
    # Seeds matter: two seeds give different codes.
    a = quantize(x, bits, 64, symmetric=symmetric, stochastic=True, seed=1, backend=backend)
    b = quantize(x, bits, 64, symmetric=symmetric, stochastic=True, seed=2, backend=backend)
    assert not torch.equal(a.codes, b.codes)
    # The same check rejects round-to-nearest on this input (the test has power).
    rtn_err, _ = _stochastic_mean_error(backend, x, bits, symmetric, False, 2)
    assert abs(rtn_err.mean().item()) > 6 * sigma_all
    assert (rtn_err.abs() > 6 * sigma_elem).any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stochastic_is_deterministic_per_seed(backend: str) -> None:
    x = torch.randn(5000)
    a = quantize(x, 4, 128, stochastic=True, seed=1234, backend=backend)
    b = quantize(x, 4, 128, stochastic=True, seed=1234, backend=backend)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)


def test_invalid_parameters() -> None:
    x = torch.randn(64)
    with pytest.raises(ValueError, match="bits=3"):
        quantize(x, 3)
    with pytest.raises(ValueError, match="group_size=48"):
        quantize(x, 8, 48)
    with pytest.raises(ValueError, match="asymmetric"):
        quantize(x, 8, 64, symmetric=False, scale_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="int32"):
        quantize(torch.ones(64, dtype=torch.int32))
