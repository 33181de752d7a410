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


def test_fused_and_reference_ops_opcheck() -> None:
    from agoq_ds.quant import backends

    backends.select(torch.device("cpu"))  # the C++ kernels register here when they load
    x = torch.randn(1000)
    q = quantize(x, 8, 64)
    torch.library.opcheck(torch.ops.agoq.dequantize_add_.default, (torch.randn(1000), q.codes, q.scales, 64))
    args = (q.codes.clone(), q.scales.clone(), torch.randn(1000), True, 64, False, 5)
    torch.library.opcheck(torch.ops.agoq.requantize_add_.default, args)
    torch.library.opcheck(torch.ops.agoq.quantize_reference.default, (x, 4, 64, False, True, 3, torch.float32))
    codes, scales, zeros = torch.ops.agoq.quantize_reference(x, 4, 64, False, False, 0, torch.float32)
    torch.library.opcheck(torch.ops.agoq.dequantize_reference.default, (codes, scales, zeros, 4, 64, 1000, x.dtype))


def _step(kernels):
    from agoq_ds.quant.fused import dequantize_add_, requantize_add_

    def step(x: torch.Tensor, acc: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        q = quantize(x, 8, 64, kernels=kernels)
        dequantize_add_(acc, q, kernels=kernels)
        requantize_add_(
            codes, scales, x.reshape(-1), has_value=True, group_size=64, stochastic=False, seed=1, kernels=kernels
        )
        return dequantize(q, kernels=kernels) * 2

    return step


@pytest.mark.parametrize("choice", [None, "torch", "cpp"])
def test_ops_and_fused_ops_compile_without_graph_breaks(choice: str | None) -> None:
    """quantize, dequantize, dequantize_add_ and requantize_add_ are graph nodes (fullgraph), with the
    process default or an engine's choice, and give the eager results."""
    from agoq_ds.quant import Kernels, backends

    if choice == "cpp" and not backends.status("cpp").available:
        pytest.skip("C++ kernels unavailable here")
    kernels = None if choice is None else Kernels(choice)
    x = torch.randn(8, 125)
    base = quantize(torch.randn(1000), 8, 64)
    inputs = (x, torch.randn(1000), base.codes.clone(), base.scales.clone())
    want = [t.clone() for t in inputs]
    want_out = _step(kernels)(*want)
    got = [t.clone() for t in inputs]
    compiled = torch.compile(_step(kernels), fullgraph=True, backend="aot_eager")
    got_out = compiled(*got)
    assert torch.equal(got_out, want_out)
    for g, w in zip(got[1:], want[1:], strict=True):
        assert torch.equal(g, w)
    explained = torch._dynamo.explain(_step(kernels))(*[t.clone() for t in inputs])
    assert explained.graph_break_count == 0
    ops_called = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    expect_q = "agoq.quantize_reference.default" if choice == "torch" else "agoq.quantize.default"
    assert expect_q in ops_called
    if choice != "torch":
        assert {"agoq.dequantize_add_.default", "agoq.requantize_add_.default"} <= ops_called


def test_two_kernel_choices_in_one_process_do_not_affect_each_other() -> None:
    """Two engines' choices side by side: each call runs its own backend (stochastic draws differ
    between the C++ kernels and the reference, so they show which ran), the process default stays."""
    from agoq_ds.quant import Kernels, backends
    from agoq_ds.quant.fused import requantize_add_

    if not backends.status("cpp").available:
        pytest.skip("C++ kernels unavailable here")
    before = backends.preferred()
    cpp, ref = Kernels("cpp"), Kernels("torch")
    x = torch.randn(4096)
    for kernels, name in ((cpp, "cpp"), (ref, "torch"), (cpp, "cpp")):
        got = quantize(x, 4, 128, stochastic=True, seed=7, kernels=kernels)
        assert torch.equal(got.codes, quantize(x, 4, 128, stochastic=True, seed=7, backend=name).codes)
        assert kernels.select(x.device) == name
    assert not torch.equal(
        quantize(x, 4, 128, stochastic=True, seed=7, kernels=cpp).codes,
        quantize(x, 4, 128, stochastic=True, seed=7, kernels=ref).codes,
    )
    results = {}
    for kernels in (cpp, ref):
        q = quantize(x, 8, 128)
        codes, scales = q.codes.clone(), q.scales.clone()
        kernels.requantize_add_(codes, scales, x, has_value=True, group_size=128, stochastic=True, seed=3)
        results[kernels.choice] = codes
        want_codes, want_scales = q.codes.clone(), q.scales.clone()
        requantize_add_(
            want_codes,
            want_scales,
            x,
            has_value=True,
            group_size=128,
            stochastic=True,
            seed=3,
            backend=kernels.choice,
        )
        assert torch.equal(codes, want_codes)
    assert not torch.equal(results["cpp"], results["torch"])
    assert backends.preferred() == before


def test_kernels_refuse_a_backend_that_cannot_run_here() -> None:
    from agoq_ds.quant import BackendUnavailable, Kernels

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(BackendUnavailable, match="'cuda' is not available"):
        Kernels("cuda")
    with pytest.raises(ValueError, match="must be auto or one of"):
        Kernels("gpu")
