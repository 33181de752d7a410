"""The C++ CPU kernels (csrc/cpu) against the pure-torch reference, plus how they are built and loaded.

Round-to-nearest must be bit-identical to reference.py (codes, scales, zeros, dequantized values)
over the whole parameter grid, through both the explicit SIMD loops and the generic ones. One
documented exception: when an asymmetric group mixes -0.0 and +0.0 as its minimum, the sign of the
stored zero is unspecified (torch's own amin does not fix it); values still compare equal.
Stochastic rounding must not depend on the number of OpenMP threads.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agoq_ds.quant import reference
from agoq_ds.quant.format import levels, qmax

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCHEMES = [(True, torch.float32), (True, torch.bfloat16), (False, torch.float32)]
SCHEME_IDS = ["sym-fp32", "sym-bf16", "asym"]


@pytest.fixture(params=["simd", "simd-stream", "generic"])
def simd(request, cpp):
    """Run a test through the explicit SIMD loops (with and without streaming stores) and the generic ones."""
    kernels = cpp._kernels()
    use_simd = request.param != "generic"
    if use_simd and not kernels.simd_compiled():
        pytest.skip("this build has no explicit SIMD loops")
    previous = kernels.set_simd(use_simd)
    threshold = kernels.set_streaming_threshold(0 if request.param == "simd-stream" else 1 << 62)
    yield use_simd
    kernels.set_simd(previous)
    kernels.set_streaming_threshold(threshold)


def _grid_data(n_groups: int, group: int, tail: int, dtype: torch.dtype, bits: int, symmetric: bool) -> torch.Tensor:
    """Random groups of very different magnitudes plus every special case the format names."""
    gen = torch.Generator().manual_seed(n_groups * 7 + group + bits)
    n = n_groups * group + tail
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    big = {torch.float32: 30.0, torch.bfloat16: 30.0, torch.float16: 3.0}[dtype]
    small = {torch.float32: -30.0, torch.bfloat16: -30.0, torch.float16: -3.0}[dtype]
    x *= torch.logspace(small, big, n_groups + 1, dtype=torch.float64).repeat_interleave(group)[:n]
    if not symmetric:
        x[: n_groups * group // 2] = x[: n_groups * group // 2].abs()  # half one-signed, half mixed
    top = qmax(bits) if symmetric else levels(bits)

    def put(k: int, values) -> None:
        x[k * group : (k + 1) * group] = torch.as_tensor(values, dtype=torch.float64)

    put(0, torch.where(torch.arange(group) == 3, float("nan"), x[:group]))
    put(1, torch.where(torch.arange(group) == group - 1, float("inf"), x[group : 2 * group]))
    put(2, torch.where(torch.arange(group) == 0, float("-inf"), x[2 * group : 3 * group]))
    put(3, torch.zeros(group))
    # Exact ties: scale 2**-2 exactly, every value k + 1/2 steps -> round half to even.
    ties = (torch.arange(group) % top - (top // 2 if symmetric else 0) + 0.5) * 0.25
    ties[0] = top * 0.25
    if not symmetric:
        ties[1] = 0.0
    put(4, ties)
    put(5, torch.full((group,), 3.0))  # constant
    if dtype != torch.float16:
        put(6, torch.linspace(1, 2, group) * 2.0**-110)  # below TINY: flushed
        put(7, torch.linspace(-1, 1, group) * 2.0**-120 + 2.0**-99)  # range below TINY, absmax above
        put(8, torch.linspace(-3e38, 3e38, group))  # asymmetric range overflows fp32
        huge = 3.4e38 if dtype == torch.float32 else 3.3e38  # 2-bit: a bf16 scale rounds to Inf
        put(9, torch.full((group,), huge) * torch.linspace(0.5, 1, group))
        if dtype == torch.float32:
            put(10, torch.randn(group, generator=gen, dtype=torch.float64) * 2.0**-140)  # subnormals, not flushed
            put(11, torch.tensor([-0.0, 0.0, 1.0, 2.0] * (group // 4)))  # asymmetric: min is -0.0 or +0.0
    if tail:
        x[-1] = float("nan") if tail % 2 else x[-1]
    return x.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def _assert_identical(ref: torch.Tensor, got: torch.Tensor, what: str, signed_zero: bool = True) -> None:
    assert ref.dtype == got.dtype and ref.shape == got.shape, (
        f"{what}: {ref.dtype}{ref.shape} vs {got.dtype}{got.shape}"
    )
    if not ref.is_floating_point():
        assert torch.equal(ref, got), f"{what}: {(ref != got).sum()} of {ref.numel()} differ"
        return
    nan_r, nan_g = torch.isnan(ref), torch.isnan(got)
    assert torch.equal(nan_r, nan_g), f"{what}: NaN positions differ"
    if signed_zero:
        same = _bits(ref)[~nan_r] == _bits(got)[~nan_g]
    else:
        same = ref[~nan_r] == got[~nan_g]
    assert same.all(), f"{what}: {(~same).sum()} of {ref.numel()} differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("symmetric", "scale_dtype"), SCHEMES, ids=SCHEME_IDS)
@pytest.mark.parametrize(("group", "n_groups", "tail"), [(32, 40, 17), (128, 16, 0), (4096, 13, 100)])
def test_round_to_nearest_bit_exact(
    cpp,
    simd,
    dtype: torch.dtype,
    bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
    group: int,
    n_groups: int,
    tail: int,
) -> None:
    x = _grid_data(n_groups, group, tail, dtype, bits, symmetric)
    ref = reference.quantize(x, bits, group, symmetric, False, 0, scale_dtype)
    got = cpp.quantize(x, bits, group, symmetric, False, 0, scale_dtype)
    _assert_identical(ref[0], got[0], "codes")
    _assert_identical(ref[1], got[1], "scales")
    if symmetric:
        assert got[2] is None
    else:
        _assert_identical(ref[2], got[2], "zeros", signed_zero=False)
    n = x.numel()
    y_ref = reference.dequantize(*ref, bits, group, n, dtype)
    _assert_identical(y_ref, cpp.dequantize(*got, bits, group, n, dtype), "dequantized")
    # Each side dequantizes the other's codes identically too.
    _assert_identical(y_ref, cpp.dequantize(*ref, bits, group, n, dtype), "cpp dequantize of reference codes")


@pytest.mark.parametrize("n", [0, 1, 5, 15, 16, 17, 31, 33, 100])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_small_and_ragged_sizes_bit_exact(cpp, simd, n: int, bits: int, dtype: torch.dtype) -> None:
    x = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3).to(dtype)
    for symmetric in (True, False):
        ref = reference.quantize(x, bits, 32, symmetric, False, 0, torch.float32)
        got = cpp.quantize(x, bits, 32, symmetric, False, 0, torch.float32)
        _assert_identical(ref[0], got[0], "codes")
        _assert_identical(ref[1], got[1], "scales")
        y_ref = reference.dequantize(*ref, bits, 32, n, dtype)
        _assert_identical(y_ref, cpp.dequantize(*got, bits, 32, n, dtype), "dequantized")


def test_noncontiguous_input(cpp) -> None:
    x = torch.randn(64, 48).t()
    ref = reference.quantize(x.contiguous(), 4, 32, True, False, 0, torch.float32)
    got = cpp.quantize(x, 4, 32, True, False, 0, torch.float32)
    _assert_identical(ref[0], got[0], "codes")


def test_stochastic_independent_of_thread_count(cpp) -> None:
    kernels = cpp._kernels()
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(3))  # well above the parallel threshold
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert kernels.max_threads() == threads
            for symmetric in (True, False):
                results.append((threads, symmetric, cpp.quantize(x, 4, 128, symmetric, True, 99, torch.float32)))
    finally:
        torch.set_num_threads(previous)
    base = {sym: r for t, sym, r in results if t == 1}
    for threads, symmetric, r in results:
        for a, b in zip(base[symmetric], r, strict=True):
            if a is not None:
                assert torch.equal(a, b), f"{threads} threads changed stochastic codes"


def test_stochastic_same_through_simd_and_generic(cpp, simd) -> None:
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    got = cpp.quantize(x, 2, 64, True, True, 5, torch.bfloat16)
    kernels = cpp._kernels()
    previous = kernels.set_simd(not simd)
    try:
        other = cpp.quantize(x, 2, 64, True, True, 5, torch.bfloat16)
    finally:
        kernels.set_simd(previous)
    assert torch.equal(got[0], other[0]) and torch.equal(got[1], other[1])


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_into_preallocated_matches(cpp, bits: int, symmetric: bool) -> None:
    x = torch.randn(10_000).to(torch.bfloat16)
    codes, scales, zeros = cpp.quantize(x, bits, 64, symmetric, False, 0, torch.float32)
    bufs = (torch.empty_like(codes), torch.empty_like(scales), None if zeros is None else torch.empty_like(zeros))
    cpp.quantize_into(x, *bufs, bits, 64, symmetric, False, 0)
    assert torch.equal(bufs[0], codes) and torch.equal(bufs[1], scales)
    if zeros is not None:
        assert torch.equal(bufs[2], zeros)
    out = torch.empty(x.numel(), dtype=torch.bfloat16)
    assert cpp.dequantize_into(codes, scales, zeros, bits, 64, out) is out
    assert torch.equal(out, cpp.dequantize(codes, scales, zeros, bits, 64, x.numel(), torch.bfloat16))
    with pytest.raises(RuntimeError, match="codes must hold"):
        cpp.quantize_into(x, bufs[0][1:], bufs[1], bufs[2], bits, 64, symmetric, False, 0)


def test_rejects_bad_arguments(cpp) -> None:
    x = torch.randn(64)
    with pytest.raises(RuntimeError, match="bits=3"):
        cpp.quantize(x, 3, 32, True, False, 0, torch.float32)
    with pytest.raises(RuntimeError, match="group_size=48"):
        cpp.quantize(x, 8, 48, True, False, 0, torch.float32)
    with pytest.raises(RuntimeError, match="not supported"):
        cpp.quantize(x.double(), 8, 32, True, False, 0, torch.float32)
    with pytest.raises(RuntimeError, match="cannot hold"):
        cpp.dequantize(torch.zeros(3, dtype=torch.int8), torch.ones(1), None, 8, 32, 10, torch.float32)


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", **env}
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=900, check=False
    )


_STATUS = (
    "from agoq_ds.quant import backends; import torch; st = backends.status('cpp'); print(st.available, st.detail)"
)


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"AGOQ_DISABLE_CPP": "1"}, "AGOQ_DISABLE_CPP"),
        ({"AGOQ_CPP_PREBUILT": "0", "AGOQ_CPP_JIT": "0"}, "AGOQ_CPP_JIT=0"),
    ],
    ids=["disabled", "no-prebuilt-no-jit"],
)
def test_falls_back_to_reference_when_unavailable(env: dict[str, str], reason: str) -> None:
    code = (
        _STATUS + "\nassert not st.available and backends.select(torch.device('cpu')) == 'torch'"
        "\nfrom agoq_ds.quant import quantize, dequantize"
        "\nx = torch.randn(1000); assert (dequantize(quantize(x, 8)) - x).abs().max() < 0.1"
    )
    proc = _run_python(code, **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert reason in proc.stdout


def test_prebuilt_module_is_used() -> None:
    if importlib.util.find_spec("agoq_ds._C.agoq_quant_cpu") is None:
        pytest.skip("no install-time build (installed with AGOQ_BUILD_OPS=0?)")
    from agoq_ds._C import agoq_quant_cpu
    from agoq_ds.quant.builder import source_hash

    if agoq_quant_cpu.source_hash() != f"h{source_hash()}":
        pytest.skip("the install-time build is older than csrc/cpu (reinstall to rebuild it)")
    proc = _run_python(_STATUS + "\nassert st.available and st.detail.startswith('prebuilt'), st")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_op_builder_jit_build(tmp_path: Path) -> None:
    code = (
        _STATUS + "\nassert st.available and st.detail.startswith('JIT-built'), st"
        "\nfrom agoq_ds.quant import reference"
        "\nx = torch.randn(1000)"
        "\na = backends.get('cpp').quantize(x, 4, 32, True, False, 0, torch.float32)"
        "\nb = reference.quantize(x, 4, 32, True, False, 0, torch.float32)"
        "\nassert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])"
    )
    proc = _run_python(code, TORCH_EXTENSIONS_DIR=str(tmp_path), AGOQ_CPP_PREBUILT="0")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout
    assert list(tmp_path.rglob("agoq_quant_cpu*.so")), "JIT build left no shared object in TORCH_EXTENSIONS_DIR"


def test_prebuilt_check_rejects_stale_or_foreign_builds() -> None:
    from types import SimpleNamespace

    from agoq_ds.quant import builder

    running = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    current = f"h{builder.source_hash()}"
    builder._check_prebuilt(SimpleNamespace(torch_version=lambda: running, source_hash=lambda: current))
    with pytest.raises(RuntimeError, match="torch"):
        builder._check_prebuilt(SimpleNamespace(torch_version=lambda: "1.0", source_hash=lambda: current))
    with pytest.raises(RuntimeError, match="stale"):
        builder._check_prebuilt(SimpleNamespace(torch_version=lambda: running, source_hash=lambda: "h0"))


def test_streaming_stores_skip_misaligned_outputs(cpp) -> None:
    kernels = cpp._kernels()
    x = torch.randn(4096)
    codes, scales, _ = cpp.quantize(x, 8, 128, True, False, 0, torch.float32)
    expected = cpp.dequantize(codes, scales, None, 8, 128, x.numel(), torch.float32)
    threshold = kernels.set_streaming_threshold(0)
    try:
        out = torch.empty(x.numel() + 1)[1:]  # contiguous, 4 bytes off the allocation's alignment
        cpp.dequantize_into(codes, scales, None, 8, 128, out)
        c = torch.empty(codes.numel() + 1, dtype=torch.int8)[1:]
        cpp.quantize_into(x, c, torch.empty_like(scales), None, 8, 128, True, False, 0)
    finally:
        kernels.set_streaming_threshold(threshold)
    assert torch.equal(out, expected) and torch.equal(c, codes)
