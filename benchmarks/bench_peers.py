"""agoq's quantization kernels next to the peers a user could pick instead, on CPU, same inputs, same run.

For each input dtype (fp32, bf16) and width (8-bit, 4-bit), with blocks of ``--group-size`` elements:

* agoq-ds: every CPU backend (``agoq_ds.quant.quantize(..., backend=name)``: the C++ kernels and the
  eager pure-torch reference) and ``torch.compile`` of the reference; absmax, linear codes.
* bitsandbytes: ``functional.quantize_blockwise`` (8-bit dynamic map) and ``quantize_4bit``
  (NF4, FP4), its CPU backend.
* torchao: the low-bit optimizers' blockwise quantizers (``torchao.optim.quant_utils``: absmax
  scale + dynamic map, 8- and 4-bit, packed as its ``OptimState4bit`` does), eager and compiled, and
  the affine primitives (``torchao.quantization.quant_primitives``, symmetric int8/int4 per block;
  int4 codes unpacked, one byte each), eager and compiled.
* memcpy of the input, for scale.

Every quantize/dequantize op is timed round-robin with the others, each followed by a memcpy, and
keeps its best time (ops slower than ``--slow-s`` on their first call run in every third round).
Every method allocates its outputs; glibc is told to keep freed memory and serve large blocks from
its heap (``mallopt``), so that repeated calls reuse pages like a training loop's allocator instead
of page-faulting fresh ``mmap``s above 32 MiB (``--no-malloc-tuning`` measures the default).
The memcpy copies into a preallocated buffer. Throughput is bytes read + written per second in each method's own format
(input + codes + scales for quantize, codes + scales + output for dequantize); ``input GB/s`` is
input bytes per second, the same yardstick for every method. Error is ``dequantize(quantize(x))``
against ``x`` on the same tensors for every method: relative L2 and max abs, on a normal input and
on one with 0.1% outliers (x50). A peer that cannot be imported or fails is listed with the reason.

The peers live in ``.peers/`` (``pip install --no-deps --target .peers -c requirements/constraints.txt
-r requirements/bench.txt``; ``scripts/bootstrap.sh`` does it), not in the product's venv.

    python benchmarks/bench_peers.py                                  # 16M elements, JSON + PNG
    python benchmarks/bench_peers.py --numel 65536 --reps 1 --no-compile --out /tmp/p.json   # smoke

Writes ``--out`` (JSON, default results/bench_peers.json) and a chart next to it (``.png``).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import importlib.metadata
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
if not __package__:  # run as a script (python benchmarks/x.py): the repository root holds the benchmarks package
    sys.path.append(str(Path(__file__).resolve().parents[1]))
# The peers (requirements/bench.txt), installed by scripts/bootstrap.sh outside the product's venv:
# transformers imports torchao whenever it is importable, so every training run would load it too.
sys.path.append(str(Path(__file__).resolve().parent.parent / ".peers"))

import torch
from tqdm import tqdm

from benchmarks._machine import machine_info, write_results

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
INPUTS = ("normal", "outliers")


@dataclass
class Candidate:
    """One quantizer: how to quantize and dequantize a flat tensor, and what it stores."""

    impl: str
    """Display name."""
    library: str
    """Package and version."""
    scheme: str
    """What the codes mean."""
    bits: int
    quantize: Callable[[torch.Tensor], object]
    """x (1-D, fp32 or bf16) -> quantized state."""
    dequantize: Callable[[object], torch.Tensor]
    """state -> x' in x's dtype."""
    stored_bytes: Callable[[object], int]
    """Bytes of codes + per-block metadata in a state."""


@dataclass
class Unavailable:
    """A method that could not be imported, built or run, and why."""

    impl: str
    library: str
    bits: int | None
    reason: str


@dataclass
class Row:
    """One timed op of one method on one case."""

    dtype: str
    bits: int
    impl: str
    library: str
    scheme: str
    op: str
    ms: float
    gbps: float
    """Bytes read + written per second, in this method's own format."""
    input_gbps: float
    """Bytes of the full-precision tensor per second (the same yardstick for every method)."""
    memcpy_gbps: float
    vs_memcpy: float
    stored_bits_per_element: float
    error: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per input distribution: ``rel_l2`` and ``max_abs`` of dequantize(quantize(x)) - x."""


def tune_malloc() -> bool:
    """Keep large freed blocks in glibc's heap (no ``mmap``/page faults per call); False if not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 62))


def _version(dist: str) -> str:
    try:
        return f"{dist} {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{dist} (not installed)"


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --- the methods -------------------------------------------------------------------------------------


def agoq_candidates(bits: int, group: int, compile_: bool) -> tuple[list[Candidate], list[Unavailable]]:
    """Every agoq backend that runs on CPU (the others listed as unavailable) and the compiled reference."""
    from agoq_ds.quant import all_status, dequantize, quantize, reference

    lib = _version("agoq-ds")
    found, missing = [], []
    for st in all_status():
        name = f"agoq {st.name}" + (" (eager reference)" if st.name == "torch" else "")
        if not (st.available and "cpu" in st.device_types):
            missing.append(Unavailable(name, lib, bits, f"not a CPU backend here: {st.detail}"))
            continue
        found.append(
            Candidate(
                name,
                lib,
                f"int{bits} absmax, linear",
                bits,
                partial(lambda x, b: quantize(x, bits, group, backend=b), b=st.name),
                partial(lambda q, b: dequantize(q, backend=b), b=st.name),
                lambda q: _nbytes(q.codes, q.scales),
            )
        )
    if compile_:
        qfn = torch.compile(lambda x: reference.quantize(x, bits, group, True, False, 0, torch.float32), dynamic=False)
        dfn = torch.compile(
            lambda s: reference.dequantize(s[0], s[1], None, bits, group, s[3], s[4]),
            dynamic=False,
        )
        found.append(
            Candidate(
                "agoq torch.compile(reference)",
                f"{lib} + {_version('torch')}",
                f"int{bits} absmax, linear",
                bits,
                lambda x: (*qfn(x), x.numel(), x.dtype),
                dfn,
                lambda s: _nbytes(s[0], s[1]),
            )
        )
    return found, missing


def bnb_candidates(bits: int, group: int, compile_: bool) -> list[Candidate]:
    """bitsandbytes' blockwise quantizers (8-bit dynamic map; NF4 and FP4) on its CPU backend."""
    import bitsandbytes.functional as F

    lib = _version("bitsandbytes")
    if bits == 8:
        return [
            Candidate(
                "bitsandbytes quantize_blockwise",
                lib,
                "8-bit dynamic map, absmax per block",
                8,
                lambda x: F.quantize_blockwise(x, blocksize=group),
                lambda s: F.dequantize_blockwise(s[0], s[1]),
                lambda s: _nbytes(s[0], s[1].absmax),
            )
        ]
    return [
        Candidate(
            f"bitsandbytes quantize_4bit {kind}",
            lib,
            f"4-bit {kind.upper()} map, absmax per block",
            4,
            partial(lambda x, k: F.quantize_4bit(x, blocksize=group, quant_type=k), k=kind),
            lambda s: F.dequantize_4bit(s[0], s[1]).view(-1),
            lambda s: _nbytes(s[0], s[1].absmax),
        )
        for kind in ("nf4", "fp4")
    ]


def torchao_qmap_candidates(bits: int, group: int, compile_: bool) -> list[Candidate]:
    """torchao's low-bit-optimizer quantizers (absmax scale + dynamic map), eager and compiled."""
    try:
        from torchao.optim import quant_utils as qu
    except ImportError:  # before torchao 0.11 they lived in the prototype namespace
        from torchao.prototype.low_bit_optim import quant_utils as qu

    lib = _version("torchao")
    if bits == 8:
        qmap = torch.tensor(qu.create_dynamic_map(signed=True), dtype=torch.float32)

        def quant(x: torch.Tensor) -> tuple:
            scaled, scale = qu.scale_tensor(x, group)
            return qu.quantize_8bit_with_qmap(scaled, qmap), scale, x.dtype

        def dequant(s: tuple) -> torch.Tensor:
            return qu.dequant_with_qmap(s[0], qmap, s[1]).to(s[2])

    else:
        qmap = torch.tensor(qu.create_dynamic_map(True, 3, 4), dtype=torch.float32)

        def quant(x: torch.Tensor) -> tuple:
            scaled, scale = qu.scale_tensor(x, group)
            codes = qu.quantize_4bit_with_qmap(scaled, qmap)
            return (codes[::2] << 4) | codes[1::2], scale, x.dtype  # OptimState4bit's packing

        def dequant(s: tuple) -> torch.Tensor:
            codes = torch.stack([s[0] >> 4, s[0] & 0b1111], dim=-1).view(-1)
            return qu.dequant_with_qmap(codes, qmap, s[1]).to(s[2])

    out = []
    for compiled in (False, True) if compile_ else (False,):
        q, d = (_compiled(quant), _compiled(dequant)) if compiled else (quant, dequant)
        out.append(
            Candidate(
                "torchao optim.quant_utils" + (" (compiled)" if compiled else ""),
                lib,
                f"{bits}-bit dynamic map, absmax per block",
                bits,
                q,
                d,
                lambda s: _nbytes(s[0], s[1]),
            )
        )
    return out


def torchao_affine_candidates(bits: int, group: int, compile_: bool) -> list[Candidate]:
    """torchao's affine quant primitives, symmetric per block of ``group`` (int4 codes unpacked)."""
    from torchao.quantization.quant_primitives import (
        MappingType,
        choose_qparams_affine,
        dequantize_affine,
        quantize_affine,
    )

    lib = _version("torchao")
    qmax = 2 ** (bits - 1) - 1
    block = (1, group)

    def quant(x: torch.Tensor) -> tuple:
        x2 = x.view(-1, group)
        scale, zero = choose_qparams_affine(
            x2, MappingType.SYMMETRIC, block, torch.int8, -qmax, qmax, scale_dtype=torch.float32
        )
        return quantize_affine(x2, block, scale, zero, torch.int8, -qmax, qmax), scale, zero, x.dtype

    def dequant(s: tuple) -> torch.Tensor:
        return dequantize_affine(s[0], block, s[1], s[2], torch.int8, -qmax, qmax, output_dtype=s[3]).view(-1)

    out = []
    for compiled in (False, True) if compile_ else (False,):
        q, d = (_compiled(quant), _compiled(dequant)) if compiled else (quant, dequant)
        out.append(
            Candidate(
                "torchao quantize_affine" + (" (compiled)" if compiled else ""),
                lib,
                f"int{bits} symmetric per block, linear" + (" (1 B per code)" if bits < 8 else ""),
                bits,
                q,
                d,
                lambda s: _nbytes(s[0], s[1]),  # the zero point of a symmetric map is not needed
            )
        )
    return out


def _compiled(fn: Callable) -> Callable:
    """``torch.compile`` with static shapes (compiled on first call, once per dtype)."""
    return torch.compile(fn, dynamic=False)


PEERS: dict[str, tuple[str, Callable[[int, int, bool], list[Candidate]]]] = {
    "bitsandbytes": ("bitsandbytes", bnb_candidates),
    "torchao optim.quant_utils": ("torchao", torchao_qmap_candidates),
    "torchao quantize_affine": ("torchao", torchao_affine_candidates),
}
"""Peer families: display name -> (distribution, factory)."""


def candidates(bits: int, args: argparse.Namespace) -> tuple[list[Candidate], list[Unavailable]]:
    """Every method for one width; import or construction failures become ``Unavailable`` entries."""
    found, missing = agoq_candidates(bits, args.group_size, not args.no_compile)
    for name, (dist, factory) in PEERS.items():
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        try:
            found += factory(bits, args.group_size, not args.no_compile)
        except Exception as exc:  # reported, not hidden
            missing.append(Unavailable(name, _version(dist), bits, f"{type(exc).__name__}: {exc}"))
    return found, missing


# --- measuring ---------------------------------------------------------------------------------------


def make_inputs(numel: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tensors every method sees: standard normal, and normal with 0.1% of elements x50."""
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(numel, generator=gen)
    outliers = normal.clone()
    idx = torch.randint(0, numel, (max(1, numel // 1000),), generator=gen)
    outliers[idx] *= 50
    return {"normal": normal.to(dtype), "outliers": outliers.to(dtype)}


def error_of(c: Candidate, x: torch.Tensor) -> dict[str, float]:
    """Relative L2 and max abs error of ``c`` on ``x`` (computed in fp64)."""
    y = c.dequantize(c.quantize(x)).reshape(-1).double()
    ref = x.double()
    diff = y - ref
    return {"rel_l2": float(diff.norm() / ref.norm()), "max_abs": float(diff.abs().max())}


def timed(fn: Callable[[], object]) -> float:
    """Wall time of one call of ``fn`` in seconds."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_case(
    dname: str,
    bits: int,
    cands: list[Candidate],
    missing: list[Unavailable],
    args: argparse.Namespace,
    bar: tqdm,
    compile_s: dict[str, float],
) -> list[Row]:
    """Errors and best times of every method on one (dtype, bits) case; failures go to ``missing``."""
    dtype = DTYPES[dname]
    inputs = make_inputs(args.numel, dtype)
    x = inputs["normal"]
    src, dst = x.clone(), torch.empty_like(x)
    ready: list[tuple[Candidate, object, dict[str, dict[str, float]]]] = []
    first_call: dict[str, float] = {}
    for c in cands:
        bar.set_postfix_str(f"{dname} int{bits} {c.impl} (first call)")
        try:
            start = time.perf_counter()
            state = c.quantize(x)
            y = c.dequantize(state)
            first = time.perf_counter() - start
            first_call[c.impl] = first
            if y.numel() != x.numel() or y.dtype != dtype:
                raise TypeError(f"dequantize returned {y.dtype}[{y.numel()}] for {dtype}[{x.numel()}]")
            if "compile" in c.impl:
                compile_s[f"{c.impl} {dname} int{bits}"] = round(first, 2)
            errors = {name: error_of(c, t) for name, t in inputs.items()}
        except Exception as exc:
            missing.append(Unavailable(c.impl, c.library, bits, f"{dname}: {type(exc).__name__}: {exc}"))
            if args.verbose:
                traceback.print_exc()
            bar.update(2)
            continue
        ready.append((c, state, errors))
    timers = [
        (c, op, fn)
        for c, s, _ in ready
        for op, fn in (("quantize", partial(c.quantize, x)), ("dequantize", partial(c.dequantize, s)))
    ]
    best = {(c.impl, op): float("inf") for c, op, _ in timers}
    best_copy = float("inf")
    for rep in range(args.reps):  # round-robin: a burst of load from elsewhere hits every method alike
        for c, op, fn in timers:
            if rep % 3 and first_call[c.impl] > args.slow_s:
                continue
            bar.set_postfix_str(f"{dname} int{bits} rep {rep + 1}/{args.reps}")
            best[c.impl, op] = min(best[c.impl, op], timed(fn))
            best_copy = min(best_copy, timed(partial(dst.copy_, src)))
    bar.update(len(timers))
    copy_gbps = 2 * _nbytes(x) / best_copy / 1e9 if timers else 0.0
    rows = []
    for c, state, errors in ready:
        stored = c.stored_bytes(state)
        for op in ("quantize", "dequantize"):
            t = best[c.impl, op]
            gbps = (_nbytes(x) + stored) / t / 1e9
            rows.append(
                Row(
                    dname,
                    bits,
                    c.impl,
                    c.library,
                    c.scheme,
                    op,
                    t * 1e3,
                    gbps,
                    _nbytes(x) / t / 1e9,
                    copy_gbps,
                    gbps / copy_gbps if copy_gbps else 0.0,
                    8 * stored / x.numel(),
                    errors,
                )
            )
    return rows


def run(args: argparse.Namespace) -> dict:
    """Build every method, time every case; returns the JSON-ready result."""
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.numel = -(-args.numel // args.group_size) * args.group_size  # whole blocks for every method
    malloc_tuned = not args.no_malloc_tuning and tune_malloc()
    machine = machine_info()
    load_start = [round(v, 2) for v in os.getloadavg()]
    compile_s: dict[str, float] = {}
    rows: list[Row] = []
    missing: list[Unavailable] = []
    per_bits = {b: candidates(b, args) for b in args.bits}
    for _, miss in per_bits.values():
        missing += miss
    total = sum(2 * len(c) for c, _ in per_bits.values()) * len(args.dtypes)
    with tqdm(total=total, desc="bench_peers", unit="op", file=sys.stderr) as bar:
        for dname in args.dtypes:
            for bits, (cands, _) in per_bits.items():
                rows += bench_case(dname, bits, cands, missing, args, bar, compile_s)
    memcpy: dict[str, float] = {}
    for r in rows:
        memcpy[r.dtype] = max(memcpy.get(r.dtype, 0.0), r.memcpy_gbps)
    return {
        "machine": machine,
        "meta": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "numel": args.numel,
            "group_size": args.group_size,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "reps": args.reps,
            "slow_s": args.slow_s,
            "malloc_tuned": malloc_tuned,
            "loadavg_start": load_start,
            "loadavg_end": [round(v, 2) for v in os.getloadavg()],
            "versions": {d: _version(d) for d in ("torch", "agoq-ds", "bitsandbytes", "torchao")},
            "compile_seconds": compile_s,
            "inputs": "normal: randn; outliers: randn with 0.1% of elements x50 (same tensors for every method)",
            "note": "shared CPU: re-measure on a quiet machine before quoting numbers",
        },
        "memcpy_gbps": memcpy,
        "results": [asdict(r) for r in rows],
        "unavailable": [asdict(m) for m in missing],
    }


# --- output ------------------------------------------------------------------------------------------


def print_table(result: dict) -> None:
    """Print results and unavailable methods as fixed-width tables."""
    head = (
        f"{'dtype':5} {'bits':>4} {'impl':38} {'op':10} {'ms':>8} {'GB/s':>6} {'in GB/s':>7} {'/memcpy':>7} "
        f"{'b/elem':>6} {'relL2 n':>8} {'relL2 o':>8} {'maxabs n':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in result["results"]:
        e = r["error"]
        print(
            f"{r['dtype']:5} {r['bits']:>4} {r['impl'][:38]:38} {r['op']:10} {r['ms']:8.2f} {r['gbps']:6.2f} "
            f"{r['input_gbps']:7.2f} {r['vs_memcpy']:7.0%} {r['stored_bits_per_element']:6.2f} "
            f"{e['normal']['rel_l2']:8.2e} {e['outliers']['rel_l2']:8.2e} {e['normal']['max_abs']:8.2e}"
        )
    for d, g in result["memcpy_gbps"].items():
        print(f"memcpy {d}: best {g:.2f} GB/s (read + written)")
    for m in result["unavailable"]:
        print(f"unavailable: {m['impl']} [{m['library']}] int{m['bits']}: {m['reason']}")
    print(f"load average start {result['meta']['loadavg_start']} end {result['meta']['loadavg_end']}")


def plot(result: dict, path: Path) -> None:
    """Per width: throughput (bytes read + written) and relative L2 error of every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    widths = sorted({r["bits"] for r in rows}, reverse=True)
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    series = [(d, op) for d in dtypes for op in ("quantize", "dequantize")]
    n_impl = max((len({r["impl"] for r in rows if r["bits"] == b}) for b in widths), default=1)
    fig, axes = plt.subplots(len(widths), 2, figsize=(14, 1.0 + 0.55 * n_impl * len(widths)), squeeze=False)
    for (ax_t, ax_e), bits in zip(axes, widths, strict=True):
        impls = list(dict.fromkeys(r["impl"] for r in rows if r["bits"] == bits))
        h = 0.8 / len(series)
        for j, (d, op) in enumerate(series):
            vals = [
                next((r["gbps"] for r in rows if (r["impl"], r["bits"], r["dtype"], r["op"]) == (i, bits, d, op)), 0)
                for i in impls
            ]
            ax_t.barh([k + j * h for k in range(len(impls))], vals, h, label=f"{d} {op}")
        for d, g in result["memcpy_gbps"].items():
            ax_t.axvline(g, ls="--", color="k" if d == "fp32" else "gray", lw=1, label=f"memcpy {d}")
        ax_t.set_yticks([k + 0.4 - h / 2 for k in range(len(impls))], impls, fontsize=8)
        ax_t.invert_yaxis()
        ax_t.set_xlabel("GB/s (bytes read + written, own format)")
        ax_t.set_title(f"{bits}-bit: throughput", fontsize=10)
        ax_t.legend(fontsize=7, loc="lower right")
        for j, inp in enumerate(INPUTS):
            vals = [
                next(
                    (
                        r["error"][inp]["rel_l2"]
                        for r in rows
                        if (r["impl"], r["bits"], r["dtype"]) == (i, bits, "fp32")
                    ),
                    0,
                )
                for i in impls
            ]
            ax_e.barh([k + j * 0.4 for k in range(len(impls))], vals, 0.4, label=f"{inp} input")
        ax_e.set_yticks([k + 0.2 for k in range(len(impls))], impls, fontsize=8)
        ax_e.invert_yaxis()
        ax_e.set_xlabel("relative L2 error (fp32 input)")
        ax_e.set_title(f"{bits}-bit: error, same inputs", fontsize=10)
        ax_e.legend(fontsize=7)
    m = result["meta"]
    fig.suptitle(
        f"blockwise quantization on CPU: {m['numel']:,} elements, block {m['group_size']}, {m['threads']} threads, "
        f"load {m['loadavg_start'][0]}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=16 * 2**20, help="elements per tensor (default 16M)")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--bits", nargs="+", type=int, default=[8, 4], choices=[8, 4])
    p.add_argument("--group-size", type=int, default=128, help="elements per block, every method")
    p.add_argument("--reps", type=int, default=5, help="timed rounds")
    p.add_argument("--slow-s", type=float, default=1.0, help="ops slower than this run in a third of the rounds")
    p.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc's mmap threshold as it is")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--only", nargs="*", help="only peer families whose name starts with one of these")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing methods")
    p.add_argument("--out", type=Path, default=Path("results/bench_peers.json"))
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table, write JSON (+ PNG); returns the result dict."""
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    write_results(result, args.out, None if args.no_plot else plot)
    return result


if __name__ == "__main__":
    main()
