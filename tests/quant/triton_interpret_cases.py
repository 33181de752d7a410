"""Checks of the Triton kernels against ``reference.py`` in Triton's CPU interpreter.

Run as a module (``python -m tests.quant.triton_interpret_cases`` from the repository root) with
``TRITON_INTERPRET=1`` set before Triton is imported (test_triton_backend.py
does this in a subprocess, because other tests import Triton normally and Triton decides at
``@triton.jit`` time whether a kernel is interpreted). Prints one JSON list of
``{"case", "ok", "detail", "seconds"}``. Importing this module does not import Triton: ``CASES``
lists the case names for pytest's parametrisation.

Round-to-nearest: codes, scales, zeros and dequantized values must be *bit-identical* to the
reference (NaN compared as NaN). Stochastic rounding: each result is floor or ceil of the scaled
value, the per-position mean over many identical groups is within 5 sigma of the input (while
round-to-nearest output fails that same check), and the seed determines the draws.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

_tb = None  # agoq_ds.quant.triton_backend, bound by _helper_kernels (kernel globals resolve here)

_DTYPES = ("float32", "bfloat16", "float16")
_EXACT = [
    f"exact-{dt}-b{bits}-{mode}" for dt in _DTYPES for bits in (2, 4, 8) for mode in ("sym-sfp32", "sym-sbf16", "asym")
]
_STOCHASTIC = [
    "stochastic-float32-b8-sym-sfp32",
    "stochastic-bfloat16-b4-sym-sbf16",
    "stochastic-float32-b2-sym-sfp32",
    "stochastic-float16-b4-asym",
    "stochastic-float32-b8-asym",
    "stochastic-bfloat16-b2-asym",
]
ZERO_SIGN = (
    "Documented exception: asymmetric zero points (the group minimum) are compared as values, so -0.0 == +0.0. "
    "When a group's minimum is zero and the group holds both +0.0 and -0.0, which sign torch.amin returns depends "
    "on element order (it is not defined by the format); a parallel min reduction cannot reproduce it. Codes and "
    "dequantized values are unaffected (q * s + (-0.0) == +0.0) and are compared bit for bit."
)

CASES = [
    "interpreter-active",
    "round-half-even",
    "bf16-round",
    "edge-sizes",
    "dequantize-bf16-scales-fp16-out",
    *_EXACT,
    *_STOCHASTIC,
]
"""Every case name, in run order."""


# ----------------------------------------------------------------------------------------------
# Everything below runs only in the interpreter subprocess.


def _same(a, b, signed_zero: bool = True) -> str | None:
    """None when ``a`` and ``b`` are identical (dtype, shape, bits; NaN == NaN), else what differs.

    ``signed_zero=False`` treats -0.0 and +0.0 as equal (used for zero points only, see ``ZERO_SIGN``).
    """
    import torch

    if a is None or b is None:
        return None if a is None and b is None else f"None vs {type(b).__name__ if a is None else type(a).__name__}"
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"dtype/shape {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    if a.is_floating_point():
        an, bn = torch.isnan(a), torch.isnan(b)
        if not torch.equal(an, bn):
            return f"NaN positions differ at {int((an != bn).nonzero()[0])}"
        a, b = a[~an], b[~bn]
        if not signed_zero:
            a, b = a + 0.0, b + 0.0  # -0.0 + 0.0 == +0.0
        ia = a.view(torch.int16 if a.element_size() == 2 else torch.int32)
        ib = b.view(torch.int16 if b.element_size() == 2 else torch.int32)
        diff = (ia != ib).nonzero()
    else:
        diff = (a != b).nonzero()
    if len(diff):
        i = int(diff[0])
        return f"{len(diff)} differ, first at {i}: {a[i].item()!r} vs {b[i].item()!r}"
    return None


def _composite(group: int, bits: int, symmetric: bool, dtype, seed: int):
    """A tensor whose groups exercise every special case, then random groups and an odd tail."""
    import torch

    from agoq_ds.quant.format import levels, qmax

    gen = torch.Generator().manual_seed(seed)
    top = qmax(bits) if symmetric else levels(bits)
    s = 2.0**-3
    segs = []

    def randn(n, scale=3.0):
        return torch.randn(n, generator=gen) * scale

    segs.append(randn(group))  # ordinary
    g = randn(group)
    g[group // 3] = float("nan")
    segs.append(g)  # NaN
    g = randn(group)
    g[5] = float("inf")
    segs.append(g)  # +Inf
    g = randn(group)
    g[-1] = float("-inf")
    segs.append(g)  # -Inf
    segs.append(torch.zeros(group))  # all zero: flushed, exact zeros back
    segs.append(randn(group, 1e-32))  # below TINY: flushed
    segs.append(torch.full((group,), -2.5))  # constant: asymmetric span 0
    # Ties: values (k + 1/2) * s with the scale fixed to s by an anchor element.
    if symmetric:
        k = torch.arange(group) % top
        sign = torch.where(torch.arange(group) % 2 == 0, 1.0, -1.0)
        g = sign * (k + 0.5) * s
        g[0] = top * s
    else:
        k = torch.arange(group) % top
        g = (k + 0.5) * s
        g[0], g[1] = 0.0, top * s
    segs.append(g)
    segs.append(randn(group) * 2.0 ** torch.randint(-20, 21, (group,), generator=gen).float())  # mixed magnitudes
    segs.append(randn(group, 1e30))  # large (inf in fp16: a non-finite group there)
    g = randn(group, 1e37)
    g[7] = 3.4028234663852886e38
    g[8] = -3.4e38
    segs.append(g)  # near FLT_MAX: bf16 scale overflow (symmetric), span overflow (asymmetric)
    segs.append(torch.rand(group, generator=gen) * 5 + 1)  # one-signed
    segs.append(randn(3 * group // 2 + 5))  # more random data, ends in a partial group
    return torch.cat(segs).to(dtype)


def _compare_roundtrip(x, bits, group, symmetric, sdt, block) -> str | None:
    import torch

    from agoq_ds.quant import reference as ref
    from agoq_ds.quant import triton_backend as tb

    r = ref.quantize(x, bits, group, symmetric, False, 0, sdt)
    k = tb.quantize(x, bits, group, symmetric, False, 0, sdt, block_elements=block)
    for name, a, b in zip(("codes", "scales", "zeros"), r, k, strict=True):
        if (msg := _same(a, b, signed_zero=name != "zeros")) is not None:
            return f"group={group} block={block}: {name}: {msg}"
    n = x.numel()
    want = ref.dequantize(*r, bits, group, n, x.dtype)
    for label, got in (
        ("dequantize(kernel codes)", tb.dequantize(*k, bits, group, n, x.dtype, block_elements=block)),
        ("dequantize(reference codes)", tb.dequantize(*r, bits, group, n, x.dtype, block_elements=block)),
        ("dequantize -> float32", tb.dequantize(*r, bits, group, n, torch.float32, block_elements=block)),
    ):
        expect = want if got.dtype == x.dtype else ref.dequantize(*r, bits, group, n, got.dtype)
        if (msg := _same(expect, got)) is not None:
            return f"group={group} block={block}: {label}: {msg}"
    return None


def _case_exact(name: str) -> str:
    import torch

    _, dt, b, *mode = name.split("-")
    bits, dtype = int(b[1:]), getattr(torch, dt)
    symmetric = mode[0] == "sym"
    sdt = torch.bfloat16 if mode[-1] == "sbf16" else torch.float32
    checked = []
    # (group size, elements per program): many groups per program with a partial last program;
    # one group per program; the smallest group with small programs.
    for group, block in ((128, None), (4096, 4096), (32, 1024)):
        x = _composite(group, bits, symmetric, dtype, seed=bits * 7 + group)
        if (msg := _compare_roundtrip(x, bits, group, symmetric, sdt, block)) is not None:
            raise AssertionError(msg)
        checked.append(f"g{group}:{x.numel()}")
    return "bit-identical: " + ", ".join(checked)


def _case_edge_sizes() -> str:
    import torch

    from agoq_ds.quant import reference as ref
    from agoq_ds.quant import triton_backend as tb

    count = 0
    # fp32 with fp32 scales in groups of 32, and the GPU run's failing shape (issue 12: a single bf16
    # element, 4-bit, bf16 scales, groups of 128) with its neighbours.
    for dtype, sdt, group in ((torch.float32, torch.float32, 32), (torch.bfloat16, torch.bfloat16, 128)):
        for n in (0, 1, 2, 3, 5, 31, 33, 129):
            for bits in (2, 4, 8):
                for symmetric in (True, False):
                    if not symmetric and sdt != torch.float32:
                        continue  # asymmetric scales are fp32 (format.py)
                    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
                    r = ref.quantize(x, bits, group, symmetric, False, 0, sdt)
                    k = tb.quantize(x, bits, group, symmetric, False, 0, sdt)
                    what = f"{dtype} numel={n} bits={bits} sym={symmetric} group={group}"
                    for i, (a, b) in enumerate(zip(r, k, strict=True)):
                        if (msg := _same(a, b, signed_zero=i != 2)) is not None:
                            raise AssertionError(f"{what}: {msg}")
                    got = tb.dequantize(*k, bits, group, n, dtype)
                    if (msg := _same(ref.dequantize(*r, bits, group, n, dtype), got)) is not None:
                        raise AssertionError(f"{what}: dequantize: {msg}")
                    count += 1
    return f"{count} dtype/size/bits/mode combinations bit-identical (numel 0..129)"


def _case_dequantize_mixed() -> str:
    """bf16 scales read back by dequantize into every output dtype."""
    import torch

    from agoq_ds.quant import reference as ref
    from agoq_ds.quant import triton_backend as tb

    x = torch.randn(5000, generator=torch.Generator().manual_seed(3)) * 40
    for bits in (2, 4, 8):
        r = ref.quantize(x, bits, 64, True, False, 0, torch.bfloat16)
        for out in (torch.float32, torch.bfloat16, torch.float16):
            got = tb.dequantize(*r, bits, 64, x.numel(), out)
            if (msg := _same(ref.dequantize(*r, bits, 64, x.numel(), out), got)) is not None:
                raise AssertionError(f"bits={bits} out={out}: {msg}")
    return "bit-identical for bits 2/4/8 x fp32/bf16/fp16 outputs"


def _helper_kernels():
    import triton
    import triton.language as tl

    from agoq_ds.quant import triton_backend

    global _tb
    _tb = triton_backend

    @triton.jit
    def round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(y_ptr + offs, _tb._round_half_even(tl.load(x_ptr + offs, mask=m)), mask=m)

    @triton.jit
    def bf16_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(y_ptr + offs, _tb._bf16_round(tl.load(x_ptr + offs, mask=m)), mask=m)

    return round_kernel, bf16_kernel


def _case_round_half_even() -> str:
    import torch

    round_kernel, _ = _helper_kernels()
    gen = torch.Generator().manual_seed(0)
    ties = torch.arange(-2 * 2**9, 2 * 2**9 + 1, dtype=torch.float32) / 4  # every quarter in [-256, 256]
    rand = (torch.rand(60000, generator=gen) * 2 - 1) * 300
    near = torch.arange(-300, 301, dtype=torch.float32) + 0.5
    near = torch.cat([near, torch.nextafter(near, near + 1), torch.nextafter(near, near - 1)])
    x = torch.cat([ties, rand, near])
    y = torch.empty_like(x)
    round_kernel[(triton_cdiv(x.numel(), 16384),)](x, y, x.numel(), BLOCK=16384)
    # (v + 1.5 * 2**23) - 1.5 * 2**23 gives +0.0 where torch.round gives -0.0 (v in [-0.5, -0.0]); the
    # kernels convert the rounded value to an integer, so only the value matters.
    if (msg := _same(torch.round(x), y, signed_zero=False)) is not None:
        raise AssertionError(msg)
    return f"{x.numel()} values in [-300, 300] (all quarters, +-1 ulp around halves) match torch.round (as values)"


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _case_bf16_round() -> str:
    import torch

    _, bf16_kernel = _helper_kernels()
    gen = torch.Generator().manual_seed(1)
    bits = torch.randint(-(2**31), 2**31 - 1, (60000,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)  # NaN payloads are not part of the contract
    edge = torch.tensor(
        [
            3.4028234663852886e38,
            -3.4028234663852886e38,
            3.3895313892515355e38,
            1.0 + 2**-8,
            1.0 + 3 * 2**-8,
            1e-40,
            -1e-45,
            0.0,
            -0.0,
            float("inf"),
            float("-inf"),
            float("nan"),
        ]
    )
    x = torch.cat([x, edge])
    y = torch.empty_like(x)
    bf16_kernel[(triton_cdiv(x.numel(), 16384),)](x, y, x.numel(), BLOCK=16384)
    if (msg := _same(x.to(torch.bfloat16).float(), y)) is not None:
        raise AssertionError(msg)
    return f"{x.numel()} random fp32 bit patterns + overflow/subnormal/inf/NaN edges match torch's .to(bfloat16)"


def _stochastic_data(bits: int, symmetric: bool, dtype, groups: int = 512, group: int = 128):
    """``groups`` identical groups: an anchor fixing the scale to ``s`` and values ``(k + f) * s``."""
    import torch

    from agoq_ds.quant.format import levels, qmax

    top = qmax(bits) if symmetric else levels(bits)
    s = 2.0**-4
    gen = torch.Generator().manual_seed(bits)
    fracs = torch.tensor([0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875])
    f = fracs[torch.randint(0, len(fracs), (group,), generator=gen)]
    if symmetric:
        k = torch.randint(-top, top, (group,), generator=gen).float()
        row = (k + f) * s
        row[0] = top * s
    else:
        k = torch.randint(0, top, (group,), generator=gen).float()
        row = (k + f) * s
        row[0], row[1] = 0.0, top * s
    return row.repeat(groups).to(dtype), s


def _bias_rejections(x32, deq, s: float, groups: int, group: int) -> int:
    """Positions whose mean over the groups is more than 5 sigma (+ fp slack) from the input."""
    import torch

    err = (deq.float() - x32).view(groups, group)
    frac = (x32.view(groups, group)[0] / s) % 1.0
    sigma = s * torch.sqrt(frac * (1 - frac) / groups)
    return int(((err.mean(0)).abs() > 5 * sigma + 1e-6 * s).sum())


def _case_stochastic(name: str) -> str:
    import torch

    from agoq_ds.quant import triton_backend as tb

    _, dt, b, *mode = name.split("-")
    bits, dtype = int(b[1:]), getattr(torch, dt)
    symmetric = mode[0] == "sym"
    sdt = torch.bfloat16 if mode[-1] == "sbf16" else torch.float32
    groups, group = 512, 128
    x, s = _stochastic_data(bits, symmetric, dtype, groups, group)
    x32 = x.float()
    n = x.numel()
    codes, scales, zeros = tb.quantize(x, bits, group, symmetric, True, 1234, sdt)
    if not torch.all(scales.float() == s):
        raise AssertionError(f"scales are not the anchored {s}")
    deq = tb.dequantize(codes, scales, zeros, bits, group, n, torch.float32)
    v = x32 / s
    q = deq / s
    if not torch.all((q == torch.floor(v)) | (q == torch.floor(v) + 1)):
        bad = int((~((q == torch.floor(v)) | (q == torch.floor(v) + 1))).sum())
        raise AssertionError(f"{bad} codes are neither floor nor ceil of x / s")
    rejected = _bias_rejections(x32, deq, s, groups, group)
    if rejected:
        raise AssertionError(f"{rejected} of {group} positions biased by more than 5 sigma")
    overall = ((deq - x32) / s).mean().item()
    if abs(overall) > 5 * 0.5 / n**0.5:
        raise AssertionError(f"mean error {overall:.5f} s exceeds 5 sigma")
    # The same check rejects round-to-nearest (so it has power), and the seed drives the draws.
    rtn = tb.dequantize(*tb.quantize(x, bits, group, symmetric, False, 0, sdt), bits, group, n, torch.float32)
    rtn_rejected = _bias_rejections(x32, rtn, s, groups, group)
    if rtn_rejected == 0:
        raise AssertionError("the bias check does not reject round-to-nearest")
    again = tb.quantize(x, bits, group, symmetric, True, 1234, sdt)[0]
    other = tb.quantize(x, bits, group, symmetric, True, 99, sdt)[0]
    if not torch.equal(again, codes):
        raise AssertionError("same seed gave different codes")
    if torch.equal(other, codes):
        raise AssertionError("different seeds gave identical codes")
    return (
        f"{n} elements: all floor/ceil, per-position means within 5 sigma (RTN rejected at {rtn_rejected}/"
        f"{group}), mean error {overall:+.5f} s, seed-deterministic"
    )


def _case_interpreter_active() -> str:
    import triton

    from agoq_ds.quant import triton_backend as tb

    if not tb.interpret_mode():
        raise AssertionError("TRITON_INTERPRET is not set")
    kernel = tb._quantize_kernel
    if type(kernel).__name__ != "InterpretedFunction":
        raise AssertionError(f"kernel is a {type(kernel).__name__}, not interpreted")
    return f"triton {triton.__version__} interpreter, kernels are {type(kernel).__name__}"


def run_case(name: str) -> str:
    """Run one case; returns a summary, raises ``AssertionError`` on a mismatch."""
    if name == "interpreter-active":
        return _case_interpreter_active()
    if name == "round-half-even":
        return _case_round_half_even()
    if name == "bf16-round":
        return _case_bf16_round()
    if name == "edge-sizes":
        return _case_edge_sizes()
    if name == "dequantize-bf16-scales-fp16-out":
        return _case_dequantize_mixed()
    if name.startswith("exact-"):
        return _case_exact(name)
    if name.startswith("stochastic-"):
        return _case_stochastic(name)
    raise KeyError(name)


def main(argv: list[str]) -> int:
    """Run the named cases (all by default) and print the JSON results."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1 before running this script", file=sys.stderr)
        return 2
    import warnings

    import numpy as np

    warnings.filterwarnings("ignore", category=RuntimeWarning)  # NaN * 0 in non-finite groups
    np.seterr(all="ignore")
    results = []
    for name in argv or CASES:
        start = time.perf_counter()
        try:
            detail, ok = run_case(name), True
        except Exception as exc:
            detail, ok = f"{type(exc).__name__}: {exc}", False
            if not isinstance(exc, AssertionError):
                detail += "\n" + traceback.format_exc(limit=4)
        results.append({"case": name, "ok": ok, "detail": detail, "seconds": round(time.perf_counter() - start, 3)})
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
