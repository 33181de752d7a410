"""Quantization throughput on CPU: every available kernel backend next to a memcpy of the same bytes.

For each input dtype (fp32, bf16) and code width (int8, int4; symmetric, round-to-nearest) it times
``quantize`` and ``dequantize`` of one large tensor with each CPU backend (the C++ kernels, the
eager pure-torch reference, and ``torch.compile`` of the reference), and ``dst.copy_(src)`` on
buffers of the input's size. Throughput is bytes read + written per second: input + codes + scales
for quantize, codes + scales + output for dequantize, 2 x the buffer for memcpy. All ops of a case
run round-robin, each followed by a memcpy, and everything keeps its best time, so the ratios
compare like conditions on a shared machine.

    python benchmarks/bench_quant.py                       # 64M elements, table + JSON + PNG
    python benchmarks/bench_quant.py --numel 100000 --no-compile --out /tmp/b.json   # smoke run

Writes ``--out`` (JSON, default results/bench_quant.json) and a bar chart next to it (``.png``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
if not __package__:  # run as a script (python benchmarks/x.py): the repository root holds the benchmarks package
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from agoq_ds.quant import backends, reference
from agoq_ds.quant.format import num_groups, packed_bytes
from benchmarks._machine import write_results

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EAGER = "torch (eager reference)"
COMPILED = "torch.compile(reference)"
INTO = "(into preallocated)"


@dataclass
class Row:
    """One timed op."""

    dtype: str
    bits: int
    op: str
    impl: str
    ms: float
    gbps: float
    memcpy_gbps: float
    """Best memcpy throughput among the runs interleaved with this case's ops."""
    vs_memcpy: float
    vs_eager: float | None = None


def timed(fn: Callable[[], object]) -> float:
    """Wall time of one call of ``fn`` in seconds."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_backends() -> dict[str, object]:
    """Available backends that accept CPU tensors, by display name (the reference as ``EAGER``)."""
    found = {}
    for st in backends.all_status():
        if st.available and "cpu" in st.device_types:
            name = EAGER if st.name == "torch" else st.name
            found[name] = backends.get(st.name)
    return found


def compiled_reference(
    bits: int, group_size: int, numel: int, dtype: torch.dtype
) -> tuple[Callable, Callable, float] | None:
    """``torch.compile``d quantize/dequantize of the reference for one case, with the compile time; None on failure."""
    try:
        start = time.perf_counter()
        quant = torch.compile(
            lambda x: reference.quantize(x, bits, group_size, True, False, 0, torch.float32), dynamic=False
        )
        deq = torch.compile(
            lambda c, s: reference.dequantize(c, s, None, bits, group_size, numel, dtype), dynamic=False
        )
        probe = torch.randn(numel).to(dtype)
        codes, scales, _ = quant(probe)
        deq(codes, scales)
        return quant, deq, time.perf_counter() - start
    except Exception as exc:  # inductor needs a working C++ toolchain; report and go on
        print(f"torch.compile unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def case_ops(
    impls: dict[str, object], x: torch.Tensor, bits: int, args: argparse.Namespace
) -> dict[str, tuple[Callable, Callable]]:
    """``{impl name: (quantize thunk, dequantize thunk)}`` for one input tensor and code width."""
    g, n, dtype = args.group_size, args.numel, x.dtype
    ops: dict[str, tuple[Callable, Callable]] = {}
    for name, mod in impls.items():
        codes, scales, _ = mod.quantize(x, bits, g, True, False, 0, torch.float32)
        ops[name] = (
            partial(mod.quantize, x, bits, g, True, False, 0, torch.float32),
            partial(mod.dequantize, codes, scales, None, bits, g, n, dtype),
        )
        if hasattr(mod, "quantize_into"):  # the same kernels without allocating (page-faulting) outputs
            c, s, y = torch.empty_like(codes), torch.empty_like(scales), torch.empty_like(x)
            ops[f"{name} {INTO}"] = (
                partial(mod.quantize_into, x, c, s, None, bits, g, True, False, 0),
                partial(mod.dequantize_into, codes, scales, None, bits, g, y),
            )
    return ops


def bench_case(
    dname: str, bits: int, impls: dict[str, object], args: argparse.Namespace, bar: tqdm, compile_s: dict[str, float]
) -> list[Row]:
    """Time every implementation on one (dtype, bits) case, round-robin with memcpy runs."""
    dtype = DTYPES[dname]
    x = torch.randn(args.numel).to(dtype)
    src, dst = x.clone(), torch.empty_like(x)
    copy_bytes = 2 * x.numel() * x.element_size()
    q_bytes = packed_bytes(args.numel, bits) + num_groups(args.numel, args.group_size) * 4
    io = {"quantize": x.numel() * x.element_size() + q_bytes, "dequantize": q_bytes + x.numel() * x.element_size()}
    ops = case_ops(impls, x, bits, args)
    if not args.no_compile:
        bar.set_postfix_str(f"compiling {dname} int{bits}")
        compiled = compiled_reference(bits, args.group_size, args.numel, dtype)
        if compiled is not None:
            cq, cd, compile_s[f"{dname}/int{bits}"] = compiled
            codes, scales, _ = cq(x)
            ops[COMPILED] = (partial(cq, x), partial(cd, codes, scales))
        else:
            bar.update(2)
    # Round-robin over all ops (each followed by a memcpy), so a burst of load from other processes
    # hits every op alike; each op keeps its best time, the ratios use the case's best memcpy.
    timers = [(name, op, fn) for name, (q, d) in ops.items() for op, fn in (("quantize", q), ("dequantize", d))]
    best = {(name, op): float("inf") for name, op, _ in timers}
    best_copy = float("inf")
    for *_, fn in timers:  # warm-up
        fn()
    for rep in range(args.reps):
        for name, op, fn in timers:
            if name == EAGER and rep % 3:  # ~0.5 s per call at 64M elements: a third of the runs
                continue
            bar.set_postfix_str(f"{dname} int{bits} rep {rep + 1}/{args.reps}")
            best[name, op] = min(best[name, op], timed(fn))
            best_copy = min(best_copy, timed(partial(dst.copy_, src)))
    bar.update(len(timers))
    copy_gbps = copy_bytes / best_copy / 1e9
    rows = []
    for name, op, _ in timers:
        gbps = io[op] / best[name, op] / 1e9
        rows.append(Row(dname, bits, op, name, best[name, op] * 1e3, gbps, copy_gbps, gbps / copy_gbps))
    for r in rows:
        eager = next((e for e in rows if e.impl == EAGER and e.op == r.op), None)
        r.vs_eager = r.gbps / eager.gbps if eager else None
    return rows


def run(args: argparse.Namespace) -> dict:
    """Time every case; returns the JSON-ready result."""
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    impls = cpu_backends()
    if args.only:
        impls = {k: v for k, v in impls.items() if any(k.startswith(o) for o in args.only)}
    compile_s: dict[str, float] = {}
    cases = [(d, b) for d in args.dtypes for b in args.bits]
    n_impls = len(impls) + sum(hasattr(m, "quantize_into") for m in impls.values()) + (0 if args.no_compile else 1)
    rows: list[Row] = []
    with tqdm(total=len(cases) * n_impls * 2, desc="bench_quant", unit="op", file=sys.stderr) as bar:
        for dname, bits in cases:
            rows += bench_case(dname, bits, impls, args, bar, compile_s)
    memcpy: dict[str, float] = {}
    for r in rows:
        memcpy[r.dtype] = max(memcpy.get(r.dtype, 0.0), r.memcpy_gbps)
    return {
        "meta": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "numel": args.numel,
            "group_size": args.group_size,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "reps": args.reps,
            "compile_seconds": compile_s,
            "backends": {s.name: s.detail for s in backends.all_status()},
        },
        "memcpy_gbps": memcpy,
        "results": [asdict(r) for r in rows],
    }


def print_table(result: dict) -> None:
    """Print the results as a fixed-width table."""
    head = f"{'dtype':5} {'bits':>4} {'op':10} {'impl':44} {'ms':>9} {'GB/s':>7} {'/memcpy':>8} {'/eager':>8}"
    print(head)
    print("-" * len(head))
    for r in result["results"]:
        eager = f"{r['vs_eager']:.1f}x" if r["vs_eager"] is not None else "-"
        print(
            f"{r['dtype']:5} {r['bits']:>4} {r['op']:10} {r['impl'][:44]:44} {r['ms']:9.2f} {r['gbps']:7.2f} "
            f"{r['vs_memcpy']:7.0%} {eager:>8}"
        )
    for d, g in result["memcpy_gbps"].items():
        print(f"memcpy {d}: best {g:.2f} GB/s (read + written); ratios use the best memcpy of each case")


def plot(result: dict, path: Path) -> None:
    """Grouped bar chart of GB/s per case and implementation, memcpy as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    cases = list(dict.fromkeys(f"{r['dtype']} int{r['bits']}\n{r['op']}" for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    width = 0.8 / max(1, len(impls))
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(cases)), 4.5))
    for i, impl in enumerate(impls):
        vals = [
            next((r["gbps"] for r in rows if r["impl"] == impl and f"{r['dtype']} int{r['bits']}\n{r['op']}" == c), 0)
            for c in cases
        ]
        ax.bar([k + i * width for k in range(len(cases))], vals, width, label=impl.split(" [")[0])
    for k, c in enumerate(cases):  # memcpy as measured alongside this case's ops
        copies = [r["memcpy_gbps"] for r in rows if f"{r['dtype']} int{r['bits']}\n{r['op']}" == c]
        ax.hlines(sum(copies) / len(copies), k - width / 2, k + 0.8 - width / 2, colors="k", linestyles="dashed")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(cases))], cases, fontsize=8)
    ax.set_ylabel("GB/s (bytes read + written)")
    ax.set_title(
        f"agoq quantization, {result['meta']['numel']:,} elements, {result['meta']['threads']} threads (dashed: memcpy)"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=64 * 2**20, help="elements per tensor (default 64M)")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--bits", nargs="+", type=int, default=[8, 4], choices=[2, 4, 8])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--reps", type=int, default=10, help="timed rounds per case (the eager reference runs in a third)")
    p.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads (default: torch's)")
    p.add_argument("--only", nargs="*", help="only backends whose display name starts with one of these")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    p.add_argument("--out", type=Path, default=Path("results/bench_quant.json"))
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
