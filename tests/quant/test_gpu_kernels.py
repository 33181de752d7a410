"""The GPU backends on CUDA tensors against the pure-torch reference (``pytest -m gpu``; skipped
without a CUDA device, run by ``scripts/gpu_check.sh``).

Round-to-nearest must be bit-exact with the reference (codes, scales and the dequantized tensor) for
every input dtype, width, group size and symmetry, with fp32 scales and, for symmetric codes, the
bf16 scales the activation path stores by default, including non-finite and tiny groups and sizes
that end inside a group (and a single element); the fused in-place accumulation ops must equal dequantize + add.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from agoq_ds.quant import backends, dequantize, quantize

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CASES = list(itertools.product(DTYPES, (2, 4, 8), (32, 128, 1024), (True, False)))
SIZES = (1, 127, 4096 + 33)


def _input(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen))
    if n > 300:
        x[5] = float("nan")  # a non-finite group
        x[200:264] = 1e-30  # a tiny group
    return x.to(dtype)


def _gpu_backends() -> list[str]:
    return [n for n in ("cuda", "triton") if backends.status(n).available]


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=["fp32-scales", "bf16-scales"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize(("dtype", "bits", "group", "symmetric"), CASES)
def test_round_to_nearest_bit_exact_with_reference(backend, dtype, bits, group, symmetric, scale_dtype) -> None:
    if backend not in _gpu_backends():
        pytest.skip(f"{backend}: {backends.status(backend).detail}")
    if scale_dtype == torch.bfloat16 and not symmetric:
        pytest.skip("bf16 scales are symmetric only (min/max codes keep fp32 scales and zeros)")
    for n in SIZES:
        x = _input(n, dtype)
        ref = quantize(x, bits, group, symmetric=symmetric, scale_dtype=scale_dtype, backend="torch")
        got = quantize(x.cuda(), bits, group, symmetric=symmetric, scale_dtype=scale_dtype, backend=backend)
        exact = {"rtol": 0, "atol": 0, "equal_nan": True, "msg": lambda m, n=n: f"n={n}: {m}"}
        torch.testing.assert_close(got.codes.cpu(), ref.codes, **exact)
        torch.testing.assert_close(got.scales.cpu(), ref.scales, **exact)
        out = dequantize(got, backend=backend).cpu()
        torch.testing.assert_close(out, dequantize(ref, backend="torch"), **exact)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_stochastic_rounding_unbiased_on_gpu(backend) -> None:
    if backend not in _gpu_backends():
        pytest.skip(f"{backend}: {backends.status(backend).detail}")
    x = torch.linspace(-1, 1, 4096, device="cuda")
    draws = torch.stack([dequantize(quantize(x, 4, 128, stochastic=True, seed=s, backend=backend)) for s in range(256)])
    step = quantize(x, 4, 128).scales.repeat_interleave(128)
    z = (draws.mean(0) - x).abs() / (step / (2 * 256**0.5))
    assert float(z.max()) < 6.0  # Hoeffding: per-draw error within one step
