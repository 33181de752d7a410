"""Predicted per-GPU memory of LLaMA 8B/13B/32B, stock versus agoq, at the paper's kind of setting.

``agoq_ds.planner.plan`` (the model behind ``agoq-ds plan``, checked against measured bytes within 5%
by ``tests/planner``) for pipeline + data parallelism with ZeRO-1 — by default PP=4, DP=8 (32 GPUs),
sequence 4096, micro-batch 1, 8 micro-batches per step (1F1B) — and agoq's default configuration.
For every model: the busiest GPU (the pipeline stage with the largest total) stock and agoq, the
reduction, the part each of weights / optimizer states / gradients / activations / agoq's working
set plays, and the paper's headline figure ("up to 52% less memory", arXiv 2605.00539) beside it.
A second table varies the pipeline x data-parallel layout (up to the paper's 64 GPUs) and notes what fits in 80 GiB.

    python benchmarks/plan_table.py                       # markdown tables + results/plan_table.json
    python benchmarks/plan_table.py --pp 8 --dp 8 --micro-batches 16

What the planner counts and leaves out is in ``agoq_ds/planner.py``'s docstring: bf16 weights, fp32
master weights + Adam moments (ZeRO-1: divided by DP), an fp32 gradient accumulation buffer (ZeRO-1:
not partitioned) versus int8 codes + scales, every activation autograd saves without activation
checkpointing, agoq's working set (one block at full width), the temporaries of agoq's bucket
reduction (``planner.reduction_working_set``) and the step's fp32 partition; no CUDA context,
allocator fragmentation or communication buffers.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

if not __package__:  # run as a script (python benchmarks/x.py): the repository root holds the benchmarks package
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from agoq_ds.config import parse_agoq_config
from agoq_ds.planner import GIB, NAMED_MODELS, Parallelism, StageMemory, plan
from benchmarks._machine import ROOT

PAPER_REDUCTION = 0.52
"""The paper's headline: "up to 52%" less memory (versus Megatron-LM/DeepSpeed baselines)."""
MODELS = ("llama-8b", "llama-13b", "llama-32b")
PARTS = ("weights", "optimizer", "gradients", "activations", "transient", "reduction")


def _part(stage: StageMemory, part: str, variant: str) -> int:
    value = getattr(stage, part)
    return value[variant] if isinstance(value, dict) else value


def busiest(stages: list[StageMemory], variant: str) -> StageMemory:
    """The stage whose GPUs hold the most for ``variant`` (what sizes the job)."""
    return max(stages, key=lambda s: s.total(variant))


def bf16_grad_stock_peak(stages: list[StageMemory]) -> int:
    """Busiest GPU of a stock run that accumulates gradients in bf16 instead of fp32."""
    return max(s.total("baseline") - s.gradients["baseline"] // 2 for s in stages)


def row(model: str, par: Parallelism, agoq: dict) -> dict:
    """Planner figures of one model at ``par``: the busiest GPU stock and agoq, parts, best stage."""
    dims = NAMED_MODELS[model]
    stages = plan(dims, par, parse_agoq_config(agoq))
    stock, ours = busiest(stages, "baseline"), busiest(stages, "agoq")
    peak_stock, peak_agoq = stock.total("baseline"), ours.total("agoq")
    return {
        "model": model,
        "name": dims.name,
        "parameters": dims.params(),
        "parallelism": asdict(par),
        "stock_peak_bytes": peak_stock,
        "agoq_peak_bytes": peak_agoq,
        "reduction": 1 - peak_agoq / peak_stock,
        # Stock DeepSpeed's own bf16 default accumulates gradients in bf16 (2 bytes per element, see
        # benchmarks/memory.py) where the planner's stock, like Megatron-LM, keeps fp32 (4 bytes).
        "reduction_vs_bf16_grad_stock": 1 - peak_agoq / bf16_grad_stock_peak(stages),
        "best_stage_reduction": max(1 - s.total("agoq") / s.total("baseline") for s in stages),
        "busiest_stage": stock.stage,
        "agoq_peak_phase": "boundary" if ours.peaks_at_boundary("agoq") else "backward",
        "parts": {p: {v: _part(stock, p, v) for v in ("baseline", "agoq")} for p in PARTS},
        "stages": [asdict(s) for s in stages],
    }


def main_table(rows: list[dict]) -> str:
    """Markdown: one line per model."""
    par = rows[0]["parallelism"]
    gpus = par["pp"] * par["dp"] * par["tp"]
    lines = [
        f"PP={par['pp']}, DP={par['dp']} ({gpus} GPUs), ZeRO-{par['zero']}, sequence {par['seq_len']}, "
        f"micro-batch {par['micro_batch']}, {par['micro_batches']} micro-batches (1F1B); busiest GPU, GiB.",
        "",
        "| model | params | stock GiB/GPU | agoq GiB/GPU | predicted reduction | paper | "
        "vs bf16-gradient stock | weights | optimizer | gradients stock→agoq | activations stock→agoq | "
        "agoq working set | agoq bucket reduction | agoq peak at |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        p = {k: {v: b / GIB for v, b in d.items()} for k, d in r["parts"].items()}
        lines.append(
            f"| {r['name']} | {r['parameters'] / 1e9:.1f}B | {r['stock_peak_bytes'] / GIB:.1f} | "
            f"{r['agoq_peak_bytes'] / GIB:.1f} | **{r['reduction']:.1%}** | up to {PAPER_REDUCTION:.0%} | "
            f"{r['reduction_vs_bf16_grad_stock']:.1%} | "
            f"{p['weights']['baseline']:.1f} | {p['optimizer']['baseline']:.1f} | "
            f"{p['gradients']['baseline']:.1f}→{p['gradients']['agoq']:.1f} | "
            f"{p['activations']['baseline']:.1f}→{p['activations']['agoq']:.1f} | {p['transient']['agoq']:.1f} | "
            f"{p['reduction']['agoq']:.1f} | {r['agoq_peak_phase']} |"
        )
    return "\n".join(lines)


def layout_table(sweep: dict[str, list[dict]], gpu_gib: float) -> str:
    """Markdown: predicted reduction of the busiest GPU per model and PPxDP layout (fits ``gpu_gib``?)."""
    layouts = list(sweep)
    head = "| model | " + " | ".join(f"PP{k.replace('x', ', DP')}" for k in layouts) + " |"
    lines = [head, "|---|" + "---:|" * len(layouts)]
    first = sweep[layouts[0]]
    for i, model in enumerate(first):
        cells = []
        for k in layouts:
            r = sweep[k][i]
            stock, ours = r["stock_peak_bytes"] / GIB, r["agoq_peak_bytes"] / GIB
            fits = ""
            if stock > gpu_gib:
                fits = (
                    f" (only agoq fits {gpu_gib:.0f} GiB)" if ours <= gpu_gib else f" (neither fits {gpu_gib:.0f} GiB)"
                )
            cells.append(f"{r['reduction']:.1%}: {stock:.0f}→{ours:.0f} GiB{fits}")
        lines.append(f"| {model['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the markdown tables and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=sorted(NAMED_MODELS))
    p.add_argument("--pp", type=int, default=4)
    p.add_argument("--dp", type=int, default=8)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--zero", type=int, default=1, choices=(0, 1, 2))
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--micro-batches", type=int, default=8)
    p.add_argument("--layouts", nargs="*", default=["4x8", "8x8", "2x16"], help="second table: PPxDP layouts")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory for the 'fits' notes")
    p.add_argument("--ds-config", type=Path, help="take the agoq block from this ds_config (default: defaults)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "plan_table.json")
    args = p.parse_args(argv)
    agoq = json.loads(args.ds_config.read_text()).get("agoq", {}) if args.ds_config else {}
    par = Parallelism(args.seq_len, args.micro_batch, args.micro_batches, args.tp, args.pp, args.dp, args.zero)
    rows = [row(m, par, agoq) for m in args.models]
    sweep = {}
    for layout in args.layouts:
        pp, dp = (int(x) for x in layout.split("x"))
        sweep[layout] = [row(m, Parallelism(**{**asdict(par), "pp": pp, "dp": dp}), agoq) for m in args.models]
    text = main_table(rows)
    if sweep:
        text += "\n\nPredicted reduction of the busiest GPU by pipeline x data-parallel layout (same otherwise):\n\n"
        text += layout_table(sweep, args.gpu_gib)
    print(text)
    command = "python benchmarks/plan_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": command,
                "agoq": agoq,
                "paper_reduction": PAPER_REDUCTION,
                "rows": rows,
                "sweep": sweep,
                "markdown": text,
            },
            indent=1,
        )
    )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
