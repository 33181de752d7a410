"""The torch.library ops: schema/fake-kernel checks, and the public API under torch.compile."""

from __future__ import annotations

import pytest
import torch

from agoq_ds.quant import dequantize, quantize


@pytest.mark.parametrize(("bits", "symmetric"), [(8, True), (4, True), (4, False), (2, True)])
def test_opcheck(bits: int, symmetric: bool) -> None:
    x = torch.randn(300, 7)
    args = (x, bits, 64, symmetric, False, 3, torch.float32)
    torch.library.opcheck(torch.ops.agoq.quantize.default, args)
    codes, scales, zeros = torch.ops.agoq.quantize(*args)
    torch.library.opcheck(torch.ops.agoq.dequantize.default, (codes, scales, zeros, bits, 64, x.numel(), x.dtype))


def test_ops_equal_the_eager_api() -> None:
    x = torch.randn(1000, dtype=torch.bfloat16)
    q = quantize(x, 4, 128, scale_dtype=torch.bfloat16)
    codes, scales, zeros = torch.ops.agoq.quantize(x, 4, 128, True, False, 0, torch.bfloat16)
    assert torch.equal(codes, q.codes) and torch.equal(scales, q.scales) and zeros.numel() == 0
    out = torch.ops.agoq.dequantize(codes, scales, zeros, 4, 128, x.numel(), x.dtype)
    assert torch.equal(out, dequantize(q).reshape(-1))


def test_public_api_compiles_to_the_custom_ops() -> None:
    def roundtrip(t: torch.Tensor) -> torch.Tensor:
        return dequantize(quantize(t, 8, 64)) * 2

    x = torch.randn(4, 333)
    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), roundtrip(x))


def test_cpu_dispatcher_kernel_is_the_native_cpp_one() -> None:
    """With the C++ kernels loaded, the op's CPU kernel is registered from C++ (no Python between the
    dispatcher and the kernel); every other device falls back to the reference."""
    from agoq_ds.quant import backends

    if not backends.status("cpp").available:
        pytest.skip("C++ kernels unavailable here")
    backends.select(torch.device("cpu"))
    for op in ("agoq::quantize", "agoq::dequantize"):
        lines = {line.split(":", 1)[0]: line for line in torch._C._dispatch_dump(op).splitlines()}
        assert "agoq_quant.cpp" in lines["CPU"], lines["CPU"]
        assert "CompositeExplicitAutograd[alias]" in lines


@pytest.mark.parametrize("preferred", ["cpp", "torch"])
def test_public_api_follows_the_backend_preference(preferred: str) -> None:
    """Stochastic draws differ between the C++ kernels and the reference, so they show which ran."""
    from agoq_ds.quant import backends

    if not backends.status("cpp").available:
        pytest.skip("C++ kernels unavailable here")
    x = torch.randn(4096)
    before = backends.preferred()
    backends.set_preferred(preferred)
    try:
        got = quantize(x, 4, 128, stochastic=True, seed=7)
    finally:
        backends.set_preferred(before)
    want = quantize(x, 4, 128, stochastic=True, seed=7, backend=preferred)
    other = quantize(x, 4, 128, stochastic=True, seed=7, backend="torch" if preferred == "cpp" else "cpp")
    assert torch.equal(got.codes, want.codes)
    assert not torch.equal(got.codes, other.codes)
