"""Property-based tests of the blockwise quantizer on every backend that can run here.

Hypothesis draws the tensor (shape incl. empty and odd sizes, dtype, memory layout), its values
(zeros, denormals, the dtype's +-max, NaN, +-Inf, magnitudes from 2**-149 to 3e38, mixed) and the
parameters (bits, group size incl. groups far larger than the tensor, symmetric or not, scale
dtype, rounding, seed). For each draw, on each backend:

* nothing raises, and the result has the layout ``format.py`` defines (code dtype and byte count,
  one scale per group, padding bits of the last byte zero);
* every finite group round-trips within the analytic bound (``bound``/``stochastic_bound``, plus
  one rounding to the output dtype) -- or, where the format's fp32/bf16 arithmetic cannot represent
  the group (its scale or range overflows), dequantizes to all-NaN, never to a wrong finite value;
* every group holding NaN or +-Inf dequantizes to all-NaN (non-finite values are never made finite);
* nothing outside the tensor is read: inputs and codes/scales are views with NaN or garbage right
  after (and before) them, which would surface in the result;
* round-to-nearest is bit-identical across backends, and every backend is deterministic per seed.

Backends: every CPU backend ``all_status()`` reports (``torch``, ``cpp`` through its SIMD and its
generic loops); the Triton kernels run the same properties in Triton's CPU interpreter, in a
subprocess (``test_triton_interpreter_runs_the_same_properties``). CUDA/Triton on a GPU run them
where a GPU exists (``AGOQ_REL_BACKENDS`` selects backends explicitly).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agoq_ds.quant import QuantizedTensor, all_status, bound, dequantize, quantize, stochastic_bound
from agoq_ds.quant.format import GROUP_SIZES, num_groups, packed_bytes, qmax

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROUNDOFF = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
"""Unit roundoff of the output dtype: the dequantized fp32 value is rounded once more to it."""
SUBNORMAL = {torch.float32: 0.0, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}
"""Smallest positive subnormal of a 16-bit output dtype (absolute rounding error floor near zero; an
fp32 result is not rounded again)."""
MAX_NUMEL = 70_000
"""Largest tensor drawn (several programs / OpenMP chunks, up to 17 groups of 4096)."""
EXAMPLES = int(os.environ.get("AGOQ_REL_QUANT_EXAMPLES", "60"))
"""Hypothesis examples per property and backend (raise it for a longer local run)."""


# --- backends -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """One way of running quantize/dequantize, with the same signature as the public API."""

    name: str
    quantize: Callable[..., QuantizedTensor]
    dequantize: Callable[[QuantizedTensor], torch.Tensor]


def _registry_backend(name: str, simd: bool | None = None) -> Backend:
    def run(fn: Callable, *args, **kwargs):
        if simd is None:
            return fn(*args, **kwargs)
        from agoq_ds.quant import backends

        kernels = backends.get("cpp")._kernels()
        previous = kernels.set_simd(simd)
        try:
            return fn(*args, **kwargs)
        finally:
            kernels.set_simd(previous)

    label = name if simd is None else f"{name}-{'simd' if simd else 'generic'}"
    return Backend(
        label,
        lambda x, *a, **k: run(quantize, x, *a, backend=name, **k),
        lambda q: run(dequantize, q, backend=name),
    )


def _triton_interpreter_backend() -> Backend:
    """The Triton kernels called directly on CPU tensors (needs ``TRITON_INTERPRET=1`` before import)."""
    from agoq_ds.quant import triton_backend as tb

    def q(x, bits, group_size, *, symmetric=True, stochastic=False, seed=0, scale_dtype=torch.float32):
        codes, scales, zeros = tb.quantize(x.contiguous(), bits, group_size, symmetric, stochastic, seed, scale_dtype)
        return QuantizedTensor(codes, scales, zeros, x.shape, x.dtype, bits, group_size)

    def dq(qt: QuantizedTensor) -> torch.Tensor:
        flat = tb.dequantize(qt.codes, qt.scales, qt.zeros, qt.bits, qt.group_size, qt.numel, qt.dtype)
        return flat.view(qt.shape)

    return Backend("triton-interpret", q, dq)


DEVICE = "cuda" if os.environ.get("AGOQ_REL_DEVICE") == "cuda" else "cpu"
"""Device of the test tensors (``AGOQ_REL_DEVICE=cuda`` on a GPU machine runs the GPU backends)."""
INTERPRETER = os.environ.get("AGOQ_REL_TRITON_INTERPRET") == "1"
"""Set in the subprocess that runs the Triton kernels in Triton's CPU interpreter."""


def available_backends() -> list[Backend]:
    """Every available backend for ``DEVICE`` tensors (the cpp one through both its loops), or
    the selection in ``AGOQ_REL_BACKENDS`` (comma-separated names)."""
    from agoq_ds.quant import backends

    wanted = os.environ.get("AGOQ_REL_BACKENDS")
    out: list[Backend] = []
    for status in all_status():
        if not status.available or DEVICE not in status.device_types:
            continue
        if wanted and status.name not in wanted.split(","):
            continue
        if status.name == "cpp":
            simd = backends.get("cpp")._kernels().simd_compiled()
            out.append(_registry_backend("cpp", simd=True) if simd else _registry_backend("cpp"))
            out.append(_registry_backend("cpp", simd=False))
        else:
            out.append(_registry_backend(status.name))
    return out


BACKENDS = [_triton_interpreter_backend()] if INTERPRETER else available_backends()
"""Backends the single-backend properties run on."""
CROSS_BACKENDS = [_registry_backend("torch"), *BACKENDS] if INTERPRETER else BACKENDS
"""Backends compared bit for bit (the interpreter run compares Triton with the reference)."""


def test_every_available_cpu_backend_is_exercised() -> None:
    names = {b.name.split("-")[0] for b in BACKENDS}
    if INTERPRETER:
        assert names == {"triton"}
        return
    expected = {s.name for s in all_status() if s.available and DEVICE in s.device_types}
    if not os.environ.get("AGOQ_REL_BACKENDS"):
        assert expected <= names, (expected, names)


# --- inputs -------------------------------------------------------------------------------------


def specials(dtype: torch.dtype) -> list[float]:
    """Values at the edges of ``dtype`` and of the format (``TINY = 2**-100``)."""
    fi = torch.finfo(dtype)
    return [
        0.0,
        -0.0,
        fi.tiny,
        -fi.tiny,
        fi.smallest_normal / 4,  # a denormal
        fi.tiny * fi.eps,  # the smallest denormal
        fi.max,
        -fi.max,
        fi.max / 2,
        2.0**-100,
        2.0**-101,
        1.0,
        -1.0,
        math.nan,
        math.inf,
        -math.inf,
    ]


BASES = ("normal", "zeros", "constant", "ramp", "mixed_exponent", "tiny", "huge", "one_signed")


@dataclass
class Case:
    """One drawn input and parameters."""

    x: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool
    stochastic: bool
    seed: int
    scale_dtype: torch.dtype

    def kwargs(self) -> dict:
        return dict(symmetric=self.symmetric, stochastic=self.stochastic, seed=self.seed, scale_dtype=self.scale_dtype)


def _base_values(base: str, n: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    fi = torch.finfo(dtype)
    if base == "zeros":
        return torch.zeros(n, dtype=torch.float64)
    if base == "constant":
        return torch.full((n,), float(torch.randn(1, generator=gen, dtype=torch.float64)) * 3)
    if base == "ramp":
        return torch.linspace(-5, 7, n, dtype=torch.float64)
    if base == "mixed_exponent":
        exp = torch.randint(math.ceil(math.log2(fi.tiny)) - 10, math.floor(math.log2(fi.max)), (n,), generator=gen)
        return torch.randn(n, generator=gen, dtype=torch.float64) * torch.pow(2.0, exp.double())
    if base == "tiny":
        return torch.randn(n, generator=gen, dtype=torch.float64) * fi.tiny * 4
    if base == "huge":
        return torch.randn(n, generator=gen, dtype=torch.float64).clamp(-4, 4) * fi.max / 4
    if base == "one_signed":
        return torch.rand(n, generator=gen, dtype=torch.float64) * 9 + 0.5
    return torch.randn(n, generator=gen, dtype=torch.float64)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """A tensor and quantization parameters (see the module docstring)."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(
        st.one_of(
            st.lists(st.integers(0, 9), max_size=4).map(tuple),  # incl. () and shapes with a 0
            st.tuples(st.integers(0, MAX_NUMEL)),
            st.tuples(st.integers(1, 300), st.integers(1, 233)),
        )
    )
    n = math.prod(shape)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    x = _base_values(draw(st.sampled_from(BASES)), n, gen, dtype)
    if n:
        edits = draw(st.lists(st.tuples(st.integers(0, n - 1), st.sampled_from(specials(dtype))), max_size=10))
        for i, v in edits:
            x[i] = v
    x = x.to(dtype).reshape(shape)  # values beyond the dtype's range become +-Inf here: also an input
    return Case(
        x=x,
        bits=draw(st.sampled_from([2, 4, 8])),
        group_size=draw(st.sampled_from(GROUP_SIZES)),
        symmetric=draw(st.booleans()),
        stochastic=draw(st.booleans()),
        seed=draw(st.integers(0, 2**63 - 1)),
        scale_dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
    )


def _normalise(case: Case) -> Case:
    if not case.symmetric:
        case.scale_dtype = torch.float32  # asymmetric scales and zeros are always fp32 (format.py)
    return case


def _layout(x: torch.Tensor, how: str) -> torch.Tensor:
    """``x`` as a contiguous view with NaN right before and after it, or as a strided view."""
    flat = x.reshape(-1)
    if how == "fenced":
        pad = 4099
        buf = torch.full((flat.numel() + 2 * pad,), float("nan"), dtype=x.dtype)
        buf[pad : pad + flat.numel()] = flat
        return buf[pad : pad + flat.numel()].view(x.shape)
    if how == "strided":
        buf = torch.full((2 * flat.numel(),), float("nan"), dtype=x.dtype)
        buf[::2] = flat
        return buf[::2].reshape(x.shape)
    return x


def _fenced(t: torch.Tensor, fill: float | int) -> torch.Tensor:
    """A copy of the 1-D tensor ``t`` as a view with ``fill`` right after its end."""
    buf = torch.full((t.numel() + 4099,), fill, dtype=t.dtype)
    buf[: t.numel()] = t
    return buf[: t.numel()]


# --- the properties -------------------------------------------------------------------------------


def _groups(t: torch.Tensor, group_size: int, fill: float) -> torch.Tensor:
    flat = t.reshape(-1).double()
    pad = num_groups(flat.numel(), group_size) * group_size - flat.numel()
    return torch.nn.functional.pad(flat, (0, pad), value=fill).view(-1, group_size)


def _unrepresentable(case: Case, finite_groups: torch.Tensor) -> torch.Tensor:
    """Finite groups the format's arithmetic cannot represent: the symmetric scale ``absmax / qmax``
    overflows ``scale_dtype``, or the asymmetric range ``max - min`` overflows fp32 (format.py)."""
    g = _groups(case.x.float(), case.group_size, 0.0).float()
    if case.symmetric:
        scale = (g.abs().amax(dim=1) / qmax(case.bits)).to(case.scale_dtype)
        return ~torch.isfinite(scale)
    n = case.x.numel()
    pad = g.numel() - n
    if pad and n:
        g[-1, -pad:] = g[-1, 0]
    return ~torch.isfinite(g.amax(dim=1) - g.amin(dim=1))


def check_layout(case: Case, q: QuantizedTensor) -> None:
    """Codes, scales and zeros have the sizes and types ``format.py`` defines."""
    n, bits = case.x.numel(), case.bits
    assert q.codes.dtype == (torch.int8 if bits == 8 and case.symmetric else torch.uint8)
    assert q.codes.shape == (packed_bytes(n, bits),)
    assert q.scales.shape == (num_groups(n, case.group_size),) and q.scales.dtype == case.scale_dtype
    assert (q.zeros is None) == case.symmetric
    if not case.symmetric:
        assert q.zeros.shape == q.scales.shape and q.zeros.dtype == torch.float32
    per_byte = 8 // bits
    if bits < 8 and n % per_byte:
        used = (n % per_byte) * bits
        assert int(q.codes[-1]) >> used == 0, "padding bits of the last byte must be zero"


def check_round_trip(case: Case, q: QuantizedTensor, y: torch.Tensor) -> dict[str, int]:
    """The bound for finite groups, NaN for non-finite or unrepresentable ones; returns counts."""
    x = case.x
    assert y.shape == x.shape and y.dtype == x.dtype
    if x.numel() == 0:
        return {"groups": 0}
    xs = _groups(x.float(), case.group_size, 0.0)
    ys = _groups(y.float(), case.group_size, 0.0)
    n_groups = xs.shape[0]
    last = x.numel() - (n_groups - 1) * case.group_size
    valid = torch.ones_like(xs, dtype=torch.bool)
    valid[-1, last:] = False
    finite = (torch.isfinite(xs) | ~valid).all(dim=1)
    all_nan = (torch.isnan(ys) | ~valid).all(dim=1)
    assert bool(all_nan[~finite].all()), "a group holding NaN/Inf must dequantize to all-NaN"
    overflow = finite & _unrepresentable(case, finite)
    assert bool(all_nan[overflow].all()), "an unrepresentable finite group must dequantize to all-NaN"
    ok = finite & ~overflow
    per_group = (stochastic_bound(q) if case.stochastic else bound(q)).double()[:, None]
    # |y32 - x| <= b in fp32; rounding y32 to the output dtype adds <= u |y32| <= u (|x| + b), or half
    # the smallest subnormal near zero.
    limit = per_group + SUBNORMAL[x.dtype]
    if ROUNDOFF[x.dtype]:
        limit = limit + (xs.abs() + per_group) * ROUNDOFF[x.dtype]
    err = (ys - xs).abs()
    inside = (err <= limit) | ~valid
    # KNOWN BUG (test_top_of_the_dtype_range_stays_finite): where the bound interval reaches past
    # the largest finite value of the dtype, q * s can round to +-Inf. Pinned here, never hidden:
    # allowed only there and only as an infinity of the input's sign.
    edge = (xs.abs() + per_group > torch.finfo(x.dtype).max) & ok[:, None] & valid
    saturated = edge & torch.isinf(ys) & (torch.sign(ys) == torch.sign(xs))
    inside |= saturated
    bad = ok & ~inside.all(dim=1)
    if bool(bad.any()):
        g = int(bad.nonzero()[0])
        i = int((~inside[g]).nonzero()[0])
        raise AssertionError(
            f"group {g} element {i}: x={xs[g, i].item()!r} -> {ys[g, i].item()!r}, error {err[g, i].item():.4g} "
            f"> bound {limit[g, i].item():.4g} (scale {q.scales[g].item()!r})"
        )
    return {
        "groups": n_groups,
        "finite": int(ok.sum()),
        "nonfinite": int((~finite).sum()),
        "overflow": int(overflow.sum()),
        "saturated_to_inf": int(saturated.sum()),
    }


FIGURES: dict[str, int] = {"examples": 0, "elements": 0, "groups": 0}
"""What the properties saw in this process (printed at the end of the module for docs/reliability.md)."""


def _tally(counts: dict[str, int], numel: int) -> None:
    FIGURES["examples"] += 1
    FIGURES["elements"] += numel
    for k, v in counts.items():
        FIGURES[k] = FIGURES.get(k, 0) + v


SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@SETTINGS
@given(case=cases(), layout=st.sampled_from(["contiguous", "fenced", "strided"]))
def test_round_trip_bound_nan_inf_and_layout(backend: Backend, case: Case, layout: str) -> None:
    case = _normalise(case)
    x = _layout(case.x, layout).to(DEVICE)
    q = _to(backend.quantize(x, case.bits, case.group_size, **case.kwargs()), "cpu")
    check_layout(case, q)
    y = backend.dequantize(_to(q, DEVICE)).cpu()
    _tally(check_round_trip(case, q, y), case.x.numel())
    again = backend.quantize(x, case.bits, case.group_size, **case.kwargs())
    assert torch.equal(again.codes.cpu(), q.codes), "same input and seed must give the same codes"
    assert _same(again.scales.cpu(), q.scales)


def _meta(q: QuantizedTensor) -> tuple:
    return q.shape, q.dtype, q.bits, q.group_size


def _to(q: QuantizedTensor, device: str) -> QuantizedTensor:
    zeros = q.zeros.to(device) if q.zeros is not None else None
    return QuantizedTensor(q.codes.to(device), q.scales.to(device), zeros, *_meta(q))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, NaN equal to NaN."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a[~torch.isnan(a)], b[~torch.isnan(b)])


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@SETTINGS
@given(case=cases())
def test_dequantize_reads_only_its_codes_and_scales(backend: Backend, case: Case) -> None:
    case = _normalise(case)
    q = backend.quantize(case.x.to(DEVICE), case.bits, case.group_size, **case.kwargs())
    q = _to(q, "cpu")
    fenced = QuantizedTensor(
        _fenced(q.codes, 0x55),
        _fenced(q.scales, float("nan")),
        _fenced(q.zeros, float("nan")) if q.zeros is not None else None,
        *_meta(q),
    )
    assert _same(backend.dequantize(_to(fenced, DEVICE)).cpu(), backend.dequantize(_to(q, DEVICE)).cpu())


@pytest.mark.skipif(len({b.name.split("-")[0] for b in CROSS_BACKENDS}) < 2, reason="one backend only")
@SETTINGS
@given(case=cases())
def test_round_to_nearest_is_bit_identical_across_backends(case: Case) -> None:
    case = _normalise(case)
    case.stochastic = False
    if INTERPRETER and case.x.dtype == torch.bfloat16:
        # Triton's CPU interpreter reads bf16 subnormals as 0 (GPU loads are exact): compare the rest.
        tiny = torch.finfo(torch.bfloat16).tiny
        case.x = torch.where(case.x.float().abs() < tiny, torch.zeros_like(case.x), case.x)
    results = []
    for backend in CROSS_BACKENDS:
        q = _to(backend.quantize(case.x.to(DEVICE), case.bits, case.group_size, **case.kwargs()), "cpu")
        results.append((backend.name, q, backend.dequantize(_to(q, DEVICE)).cpu()))
    name0, q0, y0 = results[0]
    for name, q, y in results[1:]:
        assert torch.equal(q.codes, q0.codes), (name0, name, "codes")
        assert _same(q.scales, q0.scales), (name0, name, "scales")
        if q.zeros is not None:
            # The sign of a zero minimum is unspecified (format.py); compare values, NaN as NaN.
            assert _same(q.zeros + 0.0, q0.zeros + 0.0), (name0, name, "zeros")
        assert _same(y, y0), (name0, name, "dequantized")


@pytest.mark.xfail(
    strict=True,
    reason="KNOWN BUG (reported): a finite value at the top of its dtype's range dequantizes to +-Inf when "
    "qmax * s rounds past the largest finite value (fp16 65504 with bf16 scales at 2/8 bits; bf16 max with "
    "bf16 scales; FLT_MAX at 8 bits). Fix: saturate the dequantized value in every backend's kernel.",
)
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize(
    ("dtype", "scale_dtype"),
    [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)],
    ids=["fp16-bf16scale", "bf16-bf16scale", "fp32-fp32scale"],
)
def test_top_of_the_dtype_range_stays_finite(backend: Backend, dtype: torch.dtype, scale_dtype: torch.dtype) -> None:
    top = torch.finfo(dtype).max
    x = torch.tensor([top, -top] + [1.0] * 30, dtype=dtype, device=DEVICE)
    y = backend.dequantize(backend.quantize(x, 8, 32, scale_dtype=scale_dtype))
    assert bool(torch.isfinite(y).all()), y[:2].tolist()


@pytest.mark.slow
def test_triton_interpreter_runs_the_same_properties() -> None:
    """The properties above, run on the Triton kernels in Triton's CPU interpreter (a subprocess:
    ``TRITON_INTERPRET=1`` must be set before Triton is imported)."""
    pytest.importorskip("triton")
    env = dict(os.environ)
    env.update(
        TRITON_INTERPRET="1",
        AGOQ_REL_TRITON_INTERPRET="1",
        AGOQ_REL_QUANT_EXAMPLES=os.environ.get("AGOQ_REL_TRITON_EXAMPLES", "12"),
        DS_ACCELERATOR="cpu",
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]),
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(Path(__file__)),
            "-k",
            "not test_triton_interpreter",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


def teardown_module() -> None:
    print(f"\nquantizer properties: {FIGURES}")
