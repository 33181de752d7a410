"""Quantize/dequantize throughput of the GPU backends against a device copy (issue 12's table).

For each backend (cuda, triton), input dtype, width, group size and symmetry: the time per call of
quantize and of dequantize on ``--numel`` elements (the fastest of ``--reps`` batches of 20
back-to-back calls between two CUDA events: ``autotune.time_per_call``), as bandwidth
(bytes read + written: input + codes + scales) over the bandwidth of a device-to-device copy of the
input measured in the same run (its bytes read + written). Target: >= 0.85x for >= 16M elements.

    python benchmarks/gpu_kernels.py                       # 2^28 elements, the full table
    python benchmarks/gpu_kernels.py --numel 16777216 --groups 128 --out results/gpu_kernels.json

Needs a CUDA device. Writes ``--out`` (JSON + PNG).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if not __package__:  # run as a script (python benchmarks/x.py): the repository root holds the benchmarks package
    sys.path.append(str(ROOT))

import torch  # noqa: E402

from agoq_ds.quant import backends, dequantize, quantize  # noqa: E402
from agoq_ds.quant.autotune import time_per_call  # noqa: E402
from benchmarks._machine import machine_info, write_results  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _time(fn, reps: int) -> float:
    """Seconds per call of ``fn()``: the fastest of ``reps`` batches of 20 back-to-back calls between
    two CUDA events (one call alone between events carries 10-25 us of launch latency)."""
    return time_per_call(fn, torch.device("cuda"), repeats=reps, calls=20)


def run(args: argparse.Namespace) -> dict:
    """Measure every case; returns the result dict."""
    rows = []
    names = [n for n in args.backends if backends.status(n).available]
    copy_gbps = {}
    for dname in args.dtypes:
        x = torch.randn(args.numel, device="cuda").to(DTYPES[dname])
        dst = torch.empty_like(x)
        t = _time(partial(dst.copy_, x), args.reps)
        copy_gbps[dname] = 2 * x.numel() * x.element_size() / t / 1e9
        for backend, bits, group, sym in itertools.product(names, args.bits, args.groups, (True, False)):
            q = quantize(x, bits, group, symmetric=sym, backend=backend)
            stored = q.nbytes
            tq = _time(partial(quantize, x, bits, group, symmetric=sym, backend=backend), args.reps)
            td = _time(partial(dequantize, q, backend=backend), args.reps)
            moved = x.numel() * x.element_size() + stored
            for op, t in (("quantize", tq), ("dequantize", td)):
                gbps = moved / t / 1e9
                rows.append(
                    {"backend": backend, "dtype": dname, "bits": bits, "group": group, "symmetric": sym, "op": op,
                     "ms": t * 1e3, "gbps": gbps, "vs_copy": gbps / copy_gbps[dname]}
                )  # fmt: skip
    return {"machine": machine_info(), "device": torch.cuda.get_device_name(), "numel": args.numel,
            "copy_gbps": copy_gbps, "rows": rows, "unavailable": {n: backends.status(n).detail for n in args.backends
                                                                  if n not in names}}  # fmt: skip


def table(result: dict) -> str:
    """One line per case."""
    lines = [f"{'backend':7s} {'dtype':5s} bits group sym {'op':10s} {'ms':>8s} {'GB/s':>8s} {'x copy':>7s}"]
    for r in result["rows"]:
        lines.append(
            f"{r['backend']:7s} {r['dtype']:5s} {r['bits']:4d} {r['group']:5d} {'y' if r['symmetric'] else 'n':3s} "
            f"{r['op']:10s} {r['ms']:8.3f} {r['gbps']:8.0f} {r['vs_copy']:7.2f}"
        )
    for name, why in result["unavailable"].items():
        lines.append(f"{name}: unavailable ({why})")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Bandwidth over copy of every case, one bar each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.12), 4))
    ax.bar(range(len(rows)), [r["vs_copy"] for r in rows], color=["tab:blue" if r["op"] == "quantize" else
                                                                   "tab:orange" for r in rows])  # fmt: skip
    ax.axhline(0.85, color="k", lw=0.8, ls="--")
    ax.set_ylabel("bandwidth / device copy")
    ax.set_title(f"{result['device']}: quantize (blue), dequantize (orange), {result['numel']} elements")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=2**28)
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--bits", nargs="+", type=int, default=[2, 4, 8], choices=[2, 4, 8])
    p.add_argument("--groups", nargs="+", type=int, default=[32, 128, 1024])
    p.add_argument("--backends", nargs="+", default=["cuda", "triton"])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_kernels.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_kernels.py needs a CUDA device")
    result = run(args)
    write_results(result, args.out, plot)
    print(table(result))
    return result


if __name__ == "__main__":
    main()
