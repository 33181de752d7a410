"""ZeRO-3 side by side: stock DeepSpeed (fp32 and bf16 reduce-scatter), ZeRO++ qgZ where it runs, and
agoq's 8-bit reduce-scatter, on the same model, ranks, seed and batches.

Per variant (2 gloo ranks by default, ``build_llama`` on the embedded corpus, fp32 compute so that
the only difference between runs is the gradient reduction):

* **bytes on the wire per optimizer step**, counted by ``agoq_ds.testing.stats.CollectiveMeter`` around every
  ``deepspeed.comm`` call of the steps after the first (parameter all-gathers included, split by op);
* **gradient error against fp64**: this rank's flat gradient partition at the first accumulation
  boundary, before ``step()``, versus a float64 reduce-scatter of every rank's local gradients,
  computed on an unpartitioned copy of the model (relative L2 error);
* **loss** over ``--steps`` steps (mean over ranks and micro-batches) and the held-out loss;
* seconds per step on this machine (unshaped; ``benchmarks/network.py --zero-stage 3`` gives the
  step time over a shaped 1 Gbit/s link).

``zero_quantized_gradients`` (qgZ) is DeepSpeed's own answer (4-bit, ZeRO-3 only); DeepSpeed applies
it only across nodes and its kernels are CUDA's, so on this CPU machine the variant records why it
did not run instead of a figure.

    python benchmarks/bench_zero3.py                       # results/bench_zero3.{json,png}
    python benchmarks/bench_zero3.py --steps 4 --out /tmp/z3.json   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import itertools
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a script (python benchmarks/x.py): the repository root holds the benchmarks package
    sys.path.append(str(Path(__file__).resolve().parents[1]))

VARIANTS: dict[str, dict[str, Any]] = {
    "stock_fp32": {},
    "stock_bf16": {"communication_data_type": "bf16"},
    "qgz": {"zero_optimization": {"zero_quantized_gradients": True}},
    "agoq": {"agoq": {"activation": {"enabled": False}}},
}
"""Config changes per variant over the shared ZeRO-3 config (``agoq``: 8-bit gradients only, so that
the loss compares gradient reductions alone)."""


def base_config(micro: int, ga: int) -> dict[str, Any]:
    """The shared ZeRO-3 config: every parameter partitioned, 5M-element buckets, AdamW, clipping."""
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": ga,
        "steps_per_print": 10**9,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "weight_decay": 0.1, "torch_adam": True}},
        "zero_optimization": {
            "stage": 3,
            "reduce_bucket_size": 5_000_000,
            "stage3_param_persistence_threshold": 0,
            "contiguous_gradients": True,
            "overlap_comm": False,
        },
    }


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _reference_partition(opt, reference_grads: dict[int, torch.Tensor], rank: int) -> torch.Tensor:
    parts = []
    for param in itertools.chain.from_iterable(opt.fp16_groups):
        chunk, full = param.partition_numel(), reference_grads[param.ds_id].reshape(-1)
        piece = full[rank * chunk : (rank + 1) * chunk]
        parts.append(torch.nn.functional.pad(piece, (0, chunk - piece.numel())))
    return torch.cat(parts)


def worker(rank: int, world: int, model_name: str, steps: int, micro: int, ga: int, seq: int) -> dict[str, Any]:
    """Every variant in turn on this rank (same seed and batches)."""
    from deepspeed.utils import logger

    import agoq_ds  # noqa: F401  (the "agoq" block takes effect through the patched initialize)
    from agoq_ds.testing.data import heldout_batches, load_bytes, split

    logger.setLevel(logging.ERROR)
    train, heldout = split(load_bytes(max_bytes=2_000_000))
    evaluation = heldout_batches(heldout, micro, seq, 8)
    out: dict[str, Any] = {}
    for name, extra in VARIANTS.items():
        try:
            out[name] = _run_variant(rank, world, extra, model_name, steps, micro, ga, seq, train, evaluation)
        except Exception as exc:  # qgZ on CPU: the reason is the result
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
    return out


def _run_variant(
    rank: int, world: int, extra: dict, model_name: str, steps: int, micro: int, ga: int, seq: int, train, evaluation
) -> dict[str, Any]:
    """One variant: train ``steps`` steps, measure bytes, the first boundary's partition error, losses."""
    import deepspeed
    from deepspeed import comm as dist

    from agoq_ds.testing.data import batches
    from agoq_ds.testing.models import build_llama
    from agoq_ds.testing.stats import CollectiveMeter

    model = build_llama(model_name, seed=0)
    reference = copy.deepcopy(model).double()
    engine, *_ = deepspeed.initialize(
        model=model, config=_merge(base_config(micro, ga), extra), model_parameters=model.parameters()
    )
    opt = engine.optimizer
    ids = {id(p): p.ds_id for p in engine.module.parameters()}
    by_id = {ids[id(p)]: q for p, q in zip(engine.module.parameters(), reference.parameters(), strict=True)}
    data = batches(train, micro, seq, seed=0, rank=rank, world_size=world)
    losses, error, meter, seconds = [], None, CollectiveMeter(), 0.0
    for step in range(steps):
        total = torch.zeros(1, dtype=torch.float64)
        t0 = time.perf_counter()
        if step > 0:
            meter.__enter__()
        local = {i: torch.zeros_like(q) for i, q in by_id.items()} if step == 0 else None
        for m in range(ga):
            tokens = next(data)
            loss = engine(input_ids=tokens, labels=tokens).loss
            engine.backward(loss)
            if local is not None:
                ref_loss = reference(input_ids=tokens, labels=tokens).loss / ga
                grads = torch.autograd.grad(ref_loss, list(by_id.values()))
                for i, g in zip(by_id, grads, strict=True):
                    local[i] += g
            if local is not None and m == ga - 1:
                flat = torch.cat([local[i].reshape(-1) for i in by_id])
                dist.all_reduce(flat)
                flat /= world
                sizes = [q.numel() for q in by_id.values()]
                exact = _reference_partition(opt, dict(zip(by_id, torch.split(flat, sizes), strict=True)), rank)
                got = opt.grad_partitions_flat_buffer.double()
                error = float((got - exact).norm() / exact.norm())
            engine.step()
            total += loss.item()
        if step > 0:
            meter.__exit__()
            seconds += time.perf_counter() - t0
        dist.all_reduce(total)
        losses.append(float(total) / (ga * world))
    engine.eval()
    with torch.no_grad():
        held = torch.tensor([sum(engine(input_ids=b, labels=b).loss.item() for b in evaluation) / len(evaluation)])
    dist.all_reduce(held)
    counted = max(steps - 1, 1)
    stats = engine.agoq_stats() if hasattr(engine, "agoq_stats") else {}
    result = {
        "sent_bytes_per_step": {op: b / counted for op, b in meter.sent.items()},
        "gradient_error_rel": error,
        "losses": losses,
        "final_train": sum(losses[-10:]) / len(losses[-10:]),
        "heldout": float(held) / world,
        "seconds_per_step": seconds / counted,
        "agoq_gradient": {k: v for k, v in stats.items() if k.startswith("gradient/")},
    }
    engine.destroy()
    return result


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank 0's figures per variant, with bytes and loss relative to stock fp32."""
    runs = results[0]
    stock = runs["stock_fp32"]
    gradient_ops = (
        "reduce_scatter_fn",
        "reduce_scatter_tensor",
        "all_to_all_single",
        "batch_isend_irecv",
        "all_reduce",
    )
    summary = {}
    for name, run in runs.items():
        if "error" in run:
            summary[name] = {"ran": False, "why": run["error"]}
            continue
        grad_bytes = sum(v for op, v in run["sent_bytes_per_step"].items() if op in gradient_ops)
        stock_grad = sum(v for op, v in stock["sent_bytes_per_step"].items() if op in gradient_ops)
        summary[name] = {
            "ran": True,
            "gradient_bytes_per_step": grad_bytes,
            "gradient_bytes_vs_stock_fp32": grad_bytes / stock_grad if stock_grad else None,
            "all_bytes_per_step": sum(run["sent_bytes_per_step"].values()),
            "gradient_error_rel": run["gradient_error_rel"],
            "final_train": run["final_train"],
            "heldout": run["heldout"],
            "heldout_vs_stock_fp32": run["heldout"] / stock["heldout"],
            "seconds_per_step": run["seconds_per_step"],
        }
    return summary


def plot(result: dict[str, Any], path: Path) -> None:
    """Bytes per step, gradient error and loss curves per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = {k: v for k, v in result["summary"].items() if v["ran"]}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].bar(list(ran), [v["gradient_bytes_per_step"] / 1e6 for v in ran.values()])
    axes[0].set_ylabel("gradient MB sent per step (rank 0)")
    axes[1].bar(list(ran), [v["gradient_error_rel"] for v in ran.values()])
    axes[1].set_yscale("log")
    axes[1].set_ylabel("partition error vs fp64 (relative L2)")
    for name in ran:
        axes[2].plot(result["runs"][name]["losses"], label=name)
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("train loss")
    axes[2].legend()
    fig.suptitle(f"ZeRO-3, {result['settings']['model']}, {result['settings']['world_size']} ranks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every variant, print the table, write JSON + PNG; returns the result dict."""
    from agoq_ds.testing.distributed import run_ranks
    from benchmarks._machine import machine_info, write_results

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_zero3.json")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    settings = {
        "model": args.model,
        "world_size": args.world_size,
        "steps": args.steps,
        "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum,
        "seq_len": args.seq_len,
        "command": " ".join(["python", "benchmarks/bench_zero3.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    results = run_ranks(
        worker,
        args.world_size,
        (args.model, args.steps, args.micro_batch, args.grad_accum, args.seq_len),
        timeout=3600,
    )
    result = {"settings": settings, "machine": machine_info(), "runs": results[0], "summary": summarize(results)}
    for name, row in result["summary"].items():
        if not row["ran"]:
            print(f"{name:12s} did not run: {row['why'][:160]}")
            continue
        print(
            f"{name:12s} grad bytes/step {row['gradient_bytes_per_step'] / 1e6:8.3f} MB "
            f"({row['gradient_bytes_vs_stock_fp32']:.3f}x fp32)  error {row['gradient_error_rel']:.2e}  "
            f"train {row['final_train']:.4f}  held-out {row['heldout']:.4f} ({row['heldout_vs_stock_fp32']:.4f}x)  "
            f"{row['seconds_per_step']:.3f} s/step"
        )
    write_results(result, args.out, None if args.no_plot else plot)
    return result


if __name__ == "__main__":
    main()
