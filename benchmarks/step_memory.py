"""Live memory of one training step, stock versus agoq, beside the planner (a CPU proxy of GPU peaks).

An HF LLaMA in bf16 runs forward and backward on real text, once without agoq and once with the
default activation policy (``ActivationQuantizer``, the step measured being a replayed one, as in
steady-state training). ``agoq_ds/testing/live_bytes.py`` counts the bytes of every storage the step's operators
create and frees (no allocator statistics on CPUs): the bytes alive after forward (what is stored), the
forward peak and the backward peak, with and without the bf16 parameter gradients accumulated so far
(a training framework keeps those in its gradient buffers, which the planner counts apart), for the
replayed step and for the first one (agoq traces the model's structure there). Beside them, the
planner's stored activations and its agoq working set (``agoq_ds.planner.working_set``): its peak is
stored + working set.

    python benchmarks/step_memory.py                                  # bench shape, 2 x 512 tokens
    python benchmarks/step_memory.py --model small --seq-len 128 --out /tmp/m.json   # quick
    python benchmarks/step_memory.py --snapshot a5ed953 --out results/step_memory_a5ed953.json  # earlier code

Writes ``--out`` (JSON, default results/step_memory.json) and a chart next to it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if not __package__:  # run as a script: the repository root holds the benchmarks package (appended, so
    sys.path.append(str(HERE.parent))  # agoq_ds is the install's, or --snapshot's on PYTHONPATH)

import torch  # noqa: E402

from agoq_ds import planner  # noqa: E402
from agoq_ds.activation import ActivationQuantizer  # noqa: E402
from agoq_ds.config import parse_agoq_config  # noqa: E402
from agoq_ds.testing.data import load_bytes  # noqa: E402
from agoq_ds.testing.live_bytes import measure_step  # noqa: E402
from agoq_ds.testing.models import SHAPES, build_llama  # noqa: E402
from benchmarks._machine import ROOT, SNAPSHOT_ENV, machine_info, reexec_in_snapshot, write_results  # noqa: E402

MB = 1e6


def _measured_step(model, ids: torch.Tensor) -> dict:
    step = measure_step(model, ids)
    forward_peak, backward_peak = step["peaks"]
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    return {
        "after_forward_bytes": step["after_forward"],
        "forward_peak_bytes": forward_peak,
        "backward_peak_bytes": backward_peak,
        "backward_peak_without_gradients_bytes": step["kept_peaks"][1],
        "parameter_gradient_bytes": grads,
        "peak_without_gradients_bytes": max(step["kept_peaks"]),
    }


def measure_variant(args: argparse.Namespace, agoq: bool) -> dict:
    """One variant, three steps (agoq: traced, recorded, replayed): the replayed one's figures, and the
    first step's under ``first_step``."""
    model = build_llama(args.model, dtype=torch.bfloat16, seed=0)
    quantizer = ActivationQuantizer(model, parse_agoq_config({}).activation).install() if agoq else None
    ids = load_bytes(max_bytes=args.batch * args.seq_len).long().view(args.batch, args.seq_len)
    steps = []
    for _ in range(3):
        steps.append(_measured_step(model, ids))
        if quantizer is not None:
            quantizer.on_step_end()
    return {**steps[-1], "first_step": steps[0]}


def measure(args: argparse.Namespace) -> dict:
    """Both variants and the planner's figures."""
    cfg = parse_agoq_config({})
    s = SHAPES[args.model]
    dims = planner.ModelDims(args.model, s.vocab, s.hidden, s.layers, s.heads, s.kv_heads, s.intermediate)
    par = planner.Parallelism(seq_len=args.seq_len, micro_batch=args.batch)
    (stage,) = planner.plan(dims, par, cfg)
    # A --snapshot from before the planner had a working set: its figures stop at the stored bytes.
    working_set = getattr(planner, "working_set", lambda *_: 0)
    result: dict = {
        "command": " ".join(["python", "benchmarks/step_memory.py", *sys.argv[1:]]),
        "machine": machine_info(),
        "commit": os.environ.get(SNAPSHOT_ENV, "checkout"),
        "model": args.model,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "stock": measure_variant(args, agoq=False),
        "agoq": measure_variant(args, agoq=True),
        "planner": {
            "stock_activation_bytes": stage.activations["baseline"],
            "agoq_activation_bytes": stage.activations["agoq"],
            "agoq_working_set_bytes": working_set(dims, par, 0, dims.layers, cfg),
        },
    }
    result["planner"]["agoq_peak_bytes"] = (
        result["planner"]["agoq_activation_bytes"] + result["planner"]["agoq_working_set_bytes"]
    )
    result["peak_ratio"] = (
        result["agoq"]["peak_without_gradients_bytes"] / result["stock"]["peak_without_gradients_bytes"]
    )
    return result


def plot(result: dict, path: Path) -> None:
    """Bars: after forward, forward peak, backward peak (gradients aside), stock and agoq, planner lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ("after forward", "forward peak", "backward peak without grads")
    fig, ax = plt.subplots(figsize=(7, 4))
    for j, variant in enumerate(("stock", "agoq")):
        r = result[variant]
        values = (r["after_forward_bytes"], r["forward_peak_bytes"], r["backward_peak_without_gradients_bytes"])
        ax.bar([i + 0.4 * j for i in range(3)], [v / MB for v in values], 0.38, label=variant)
    p = result["planner"]
    ax.axhline(p["stock_activation_bytes"] / MB, ls="--", color="tab:blue", label="planner: stock activations")
    ax.axhline(p["agoq_peak_bytes"] / MB, ls="--", color="tab:orange", label="planner: agoq stored + working set")
    ax.set_xticks([i + 0.2 for i in range(3)], labels)
    ax.set_ylabel("MB alive (parameters excluded)")
    ax.set_title(f"{result['model']}, {result['batch']} x {result['seq_len']} tokens, bf16: one step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Measure, write JSON and chart, print a table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench", choices=sorted(SHAPES))
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "step_memory.json")
    p.add_argument("--snapshot", metavar="REV", help="measure a commit's agoq_ds (e.g. before a change)")
    args = p.parse_args(argv)
    if args.snapshot and SNAPSHOT_ENV not in os.environ:
        reexec_in_snapshot(__file__, [a for a in sys.argv[1:]], args.snapshot)
    result = measure(args)
    write_results(result, args.out, plot)
    print(
        f"{'MB':>14s} {'after fwd':>10s} {'fwd peak':>10s} {'bwd peak':>10s} {'w/o grads':>10s} {'grads':>8s} "
        f"{'peak w/o grads':>15s}"
    )
    for variant in ("stock", "agoq"):
        for label, r in ((variant, result[variant]), (f"{variant} step 1", result[variant]["first_step"])):
            print(
                f"{label:>14s} {r['after_forward_bytes'] / MB:10.2f} {r['forward_peak_bytes'] / MB:10.2f} "
                f"{r['backward_peak_bytes'] / MB:10.2f} {r['backward_peak_without_gradients_bytes'] / MB:10.2f} "
                f"{r['parameter_gradient_bytes'] / MB:8.2f} "
                f"{r['peak_without_gradients_bytes'] / MB:15.2f}"
            )
    pl = result["planner"]
    print(
        f"planner: stock activations {pl['stock_activation_bytes'] / MB:.2f} MB, agoq stored "
        f"{pl['agoq_activation_bytes'] / MB:.2f} + working set {pl['agoq_working_set_bytes'] / MB:.2f} = "
        f"{pl['agoq_peak_bytes'] / MB:.2f} MB; measured peak ratio agoq/stock {result['peak_ratio']:.3f}"
    )
    return result


if __name__ == "__main__":
    main()
