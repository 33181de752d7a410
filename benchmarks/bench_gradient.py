"""Benchmark of the 8-bit gradient path (agoq_ds.gradient) against DeepSpeed's fp32/bf16 reduction.

Reduction mode (default), on 2 and 4 gloo ranks, with real LLaMA gradients (one backward per rank
on different text): per-step bytes on the wire, reduction error versus an fp64 reduction, and wall
time for

* ``fp32``  — DeepSpeed's ZeRO-1/2 reduction of a bucket: a ring all-reduce in fp32,
* ``bf16``  — the same in bf16 (``communication_data_type`` of a bf16 model),
* ``8bit``  — agoq's reduce-scatter (int8 + fp32 scales per 128, fp32 sum on the receiver),
* ``8bit_allreduce`` — agoq's 8-bit all-reduce (reduce-scatter + int8 all-gather);

plus gradient-buffer bytes (ZeRO-2 owned partition / ZeRO-1 full gradient: fp32, bf16, int8 +
scales, error-feedback residual) and the per-step figures the real DeepSpeed engine reports
(``agoq_stats``) next to the all-reduce bytes measured in a stock DeepSpeed run.

Parity mode (``--parity-steps N``): 2 ranks, ZeRO-1 and ZeRO-2, bf16, ``build_llama`` on the
embedded corpus, stock DeepSpeed versus 8-bit gradients with the same seed and data: loss curves,
final train loss (mean of the last 20 steps) and held-out loss, and their ratios.

    python benchmarks/bench_gradient.py                      # reduction, results/bench_gradient.{json,png}
    python benchmarks/bench_gradient.py --parity-steps 300   # + parity, results/bench_gradient_parity.{json,png}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

G = 128


# --- workers (run on every rank) ---------------------------------------------------------------


def _quiet() -> None:
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def _real_gradient(model_name: str, rank: int, world: int) -> torch.Tensor:
    """The flat fp32 gradient of one LLaMA backward on this rank's own text."""
    from agoq_ds.testing.data import batches, load_bytes, split
    from agoq_ds.testing.models import build_llama

    model = build_llama(model_name, seed=0)
    train, _ = split(load_bytes(max_bytes=2_000_000))
    tokens = next(batches(train, 2, 128, seed=1, rank=rank, world_size=world))
    model(input_ids=tokens, labels=tokens).loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _warm_up() -> None:
    """Load the quantization kernels (a JIT build check on first use) outside the timed region."""
    from agoq_ds.quant import dequantize, quantize

    dequantize(quantize(torch.randn(4096), 8, G))


def _timed(fn, reps: int) -> tuple[Any, float]:
    from deepspeed import comm as dist

    times, out = [], None
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        out = fn()
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed))
    return out, statistics.median(times)


def reduction_worker(rank: int, world: int, model_name: str, reps: int) -> dict[str, Any]:
    """Bytes, error and time of each reduction of the same real gradient."""
    from deepspeed import comm as dist

    from agoq_ds.gradient.accumulator import Int8Accumulator
    from agoq_ds.gradient.collectives import (
        CommCounter,
        all_reduce_8bit,
        even_owner_map,
        gather_slices,
        reduce_scatter_8bit,
        relative_error,
        ring_allreduce_bytes,
    )

    _quiet()
    grad = _real_gradient(model_name, rank, world)
    n = grad.numel()
    _warm_up()
    owner = even_owner_map(n, world)
    exact = grad.double()
    dist.all_reduce(exact)
    exact_mine = gather_slices(exact, owner[rank])

    def stock(dtype: torch.dtype):
        def run() -> torch.Tensor:
            buf = grad.to(dtype, copy=True)
            dist.all_reduce(buf)
            return gather_slices(buf, owner[rank]).float()

        return run

    results: dict[str, Any] = {"numel": n, "world": world}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out, seconds = _timed(stock(dtype), reps)
        results[name] = {
            "bytes": ring_allreduce_bytes(n, world, torch.tensor([], dtype=dtype).element_size()),
            "rel_error": relative_error(out, exact_mine),
            "seconds": seconds,
        }
    counter = CommCounter()
    out, seconds = _timed(lambda: reduce_scatter_8bit(grad, owner, group_size=G, counter=counter).values, reps)
    results["8bit"] = {
        "bytes": counter.sent_bytes / reps,
        "rel_error": relative_error(out, exact_mine),
        "seconds": seconds,
    }
    counter = CommCounter()
    out, seconds = _timed(lambda: all_reduce_8bit(grad, group_size=G, counter=counter), reps)
    results["8bit_allreduce"] = {
        "bytes": counter.sent_bytes / reps,
        "rel_error": relative_error(out, exact),
        "seconds": seconds,
    }
    naive_bf16 = exact_mine.float().bfloat16()  # what bf16 storage of the exact result would lose
    results["bf16_storage_floor"] = relative_error(naive_bf16, exact_mine)
    for method in ("fp32", "bf16", "8bit", "8bit_allreduce"):
        for gbit in (1, 10, 100):  # time the bytes alone would take on such a link
            results[method][f"wire_ms_at_{gbit}gbit"] = results[method]["bytes"] * 8 / (gbit * 1e9) * 1e3

    partition = len(exact_mine)
    acc = Int8Accumulator(partition, G, error_feedback=True)
    acc.add_(exact_mine.float())
    results["buffer"] = {
        "zero2_partition": {"numel": partition, "fp32": 4 * partition, "bf16": 2 * partition, "int8": acc.nbytes},
        "zero1_full": {"numel": n, "fp32": 4 * n, "bf16": 2 * n, "int8": n + 4 * -(-n // G)},
        "ef_residual_zero2": acc.residual_nbytes,
    }
    return results


def engine_worker(rank: int, world: int, model_name: str, steps: int) -> dict[str, Any]:
    """Per-step figures from real DeepSpeed engines: agoq_stats, and stock all-reduce bytes."""
    import deepspeed
    from deepspeed import comm as dist

    from agoq_ds.config import parse_agoq_config
    from agoq_ds.deepspeed.install import agoq_zero_optimizer
    from agoq_ds.testing.data import batches, load_bytes, split
    from agoq_ds.testing.models import build_llama

    _quiet()
    _warm_up()
    train, _ = split(load_bytes(max_bytes=2_000_000))
    out: dict[str, Any] = {}
    for stage in (1, 2):
        for agoq in (False, True):
            model = build_llama(model_name, seed=0)
            config = {
                "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": 2,
                "steps_per_print": 10**9,
                "zero_optimization": {"stage": stage, "reduce_bucket_size": 5e6},
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
                "bf16": {"enabled": True},
            }
            ctx = agoq_zero_optimizer(parse_agoq_config({})) if agoq else contextlib.nullcontext()
            with ctx:
                engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
            data = batches(train, 2, 64, seed=0, rank=rank, world_size=world)
            counted = {"bytes": 0.0}
            original = dist.all_reduce

            def counting(tensor, *args, _orig=original, _c=counted, **kwargs):
                if tensor.numel() > 16:
                    _c["bytes"] += ring_bytes(tensor.numel(), world, tensor.element_size())
                return _orig(tensor, *args, **kwargs)

            t0 = time.perf_counter()
            for micro in range((steps + 1) * 2):  # the first step is a warm-up
                if micro == 2:
                    counted["bytes"] = 0.0
                    t0 = time.perf_counter()
                tokens = next(data)
                loss = engine(input_ids=tokens, labels=tokens).loss
                dist.all_reduce = counting
                try:
                    engine.backward(loss)
                finally:
                    dist.all_reduce = original
                engine.step()
            seconds = (time.perf_counter() - t0) / steps
            stats = engine.optimizer.agoq_stats() if agoq else {}
            out[f"zero{stage}_{'agoq' if agoq else 'stock'}"] = {
                "allreduce_bytes_per_step": counted["bytes"] / steps,
                "seconds_per_step": seconds,
                "stats": stats,
            }
    return out


def ring_bytes(numel: int, world: int, element_size: int) -> float:
    """Ring all-reduce bytes per rank."""
    return 2.0 * (world - 1) / world * numel * element_size


PARITY_RUNS = (
    # name, ZeRO stage, "agoq" block (None: stock DeepSpeed), extra DeepSpeed config
    ("zero1_stock", 1, None, {}),
    ("zero1_agoq", 1, {}, {}),
    ("zero2_stock", 2, None, {}),
    ("zero2_agoq", 2, {}, {}),
    # references: stock with fp32 gradient accumulation; 8-bit without error feedback
    ("zero2_stock_fp32acc", 2, None, {"data_types": {"grad_accum_dtype": "fp32"}}),
    ("zero2_agoq_noef_sr", 2, {"gradient": {"error_feedback": False, "rounding": "stochastic"}}, {}),
)
"""Runs of the parity mode (same seed, data and hyper-parameters)."""


def parity_worker(rank: int, world: int, model_name: str, steps: int) -> dict[str, Any]:
    """Stock versus 8-bit gradients, ZeRO-1 and ZeRO-2, bf16: loss curves and held-out loss."""
    import deepspeed
    from deepspeed import comm as dist

    from agoq_ds.config import parse_agoq_config
    from agoq_ds.deepspeed.install import agoq_zero_optimizer
    from agoq_ds.testing.data import batches, heldout_batches, load_bytes, split
    from agoq_ds.testing.models import build_llama

    _quiet()
    train, heldout = split(load_bytes())
    evaluation = heldout_batches(heldout, 4, 64, 16)
    out: dict[str, Any] = {}
    for name, stage, agoq, extra in PARITY_RUNS:
        model = build_llama(model_name, seed=0)
        config = {
            "train_micro_batch_size_per_gpu": 4,
            "gradient_accumulation_steps": 2,
            "steps_per_print": 10**9,
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 5e5},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "bf16": {"enabled": True},
            **extra,
        }
        ctx = agoq_zero_optimizer(parse_agoq_config(agoq)) if agoq is not None else contextlib.nullcontext()
        with ctx:
            engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
        data = batches(train, 4, 64, seed=0, rank=rank, world_size=world)
        losses = []
        t0 = time.perf_counter()
        for _ in range(steps):
            total = torch.zeros(1, dtype=torch.float64)
            for _ in range(2):
                tokens = next(data)
                loss = engine(input_ids=tokens, labels=tokens).loss
                engine.backward(loss)
                engine.step()
                total += loss.item()
            dist.all_reduce(total)
            losses.append(float(total) / (2 * world))
        seconds = time.perf_counter() - t0
        engine.eval()
        with torch.no_grad():
            held = torch.tensor([sum(engine(input_ids=b, labels=b).loss.item() for b in evaluation) / len(evaluation)])
        dist.all_reduce(held)
        out[name] = {
            "losses": losses,
            "final_train": sum(losses[-20:]) / len(losses[-20:]),
            "heldout": float(held) / world,
            "seconds": seconds,
        }
    for name, stage, agoq, _ in PARITY_RUNS:
        if agoq is None:
            continue
        for ref in (f"zero{stage}_stock", "zero2_stock_fp32acc"):
            out[f"{name}_vs_{ref}"] = {
                "final_train": out[name]["final_train"] / out[ref]["final_train"],
                "heldout": out[name]["heldout"] / out[ref]["heldout"],
            }
    return out


# --- driver ------------------------------------------------------------------------------------


def _plot_reduction(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ["fp32", "bf16", "8bit", "8bit_allreduce"]
    worlds = sorted(results["reduction"], key=int)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    width = 0.8 / len(worlds)
    for j, w in enumerate(worlds):
        r = results["reduction"][w]
        xs = [i + j * width for i in range(len(methods))]
        axes[0].bar(xs, [r[m]["bytes"] / 2**20 for m in methods], width, label=f"{w} ranks")
        axes[1].bar(xs, [max(r[m]["rel_error"], 1e-9) for m in methods], width, label=f"{w} ranks")
        axes[2].bar(xs, [r[m]["seconds"] * 1e3 for m in methods], width, label=f"{w} ranks")
    for ax, title in zip(axes[:3], ["MiB sent per rank", "relative error vs fp64", "wall time (ms)"], strict=True):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(methods))], methods)
        ax.set_title(title)
        ax.legend()
    axes[1].set_yscale("log")
    buf = dict(results["reduction"][worlds[0]]["buffer"]["zero2_partition"])
    buf["int8 + EF"] = buf["int8"] + results["reduction"][worlds[0]]["buffer"]["ef_residual_zero2"]
    kinds = ["fp32", "bf16", "int8", "int8 + EF"]
    axes[3].bar(kinds, [buf[k] / 2**20 for k in kinds], color=["C0", "C1", "C2", "C3"])
    axes[3].set_title(f"ZeRO-2 gradient buffer, {worlds[0]} ranks (MiB)")
    fig.suptitle(f"agoq 8-bit gradients: {results['model']} ({results['reduction'][worlds[0]]['numel']:,} params)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _smooth(values: list[float], k: int = 10) -> list[float]:
    return [sum(values[max(0, i - k + 1) : i + 1]) / len(values[max(0, i - k + 1) : i + 1]) for i in range(len(values))]


def _plot_parity(parity: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, stage in zip(axes, (1, 2), strict=True):
        for name, run_stage, _, _ in PARITY_RUNS:
            if run_stage != stage:
                continue
            run = parity[name]
            ax.plot(_smooth(run["losses"]), label=f"{name} (held-out {run['heldout']:.3f})", alpha=0.8)
        ax.set_title(f"ZeRO-{stage}, bf16, 2 ranks: train loss (moving mean of 10)")
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); returns what it wrote to the JSON files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="10m", help="build_llama shape for the reduction benchmark")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--engine-steps", type=int, default=2, help="steps of the DeepSpeed engine measurement")
    parser.add_argument("--parity-steps", type=int, default=0, help="run the parity mode for this many steps")
    parser.add_argument("--parity-model", default="tiny")
    parser.add_argument("--out", default=str(ROOT / "results"))
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from agoq_ds.testing.distributed import run_ranks

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"model": args.model, "reduction": {}, "engine": {}}
    for world in args.worlds:
        t0 = time.time()
        results["reduction"][str(world)] = run_ranks(reduction_worker, world, (args.model, args.reps))[0]
        results["engine"][str(world)] = run_ranks(engine_worker, world, (args.model, args.engine_steps))[0]
        print(f"world {world}: {time.time() - t0:.0f} s", flush=True)
    (out / "bench_gradient.json").write_text(json.dumps(results, indent=1))
    _plot_reduction(results, out / "bench_gradient.png")
    _print_summary(results)
    if args.parity_steps:
        t0 = time.time()
        parity = run_ranks(parity_worker, 2, (args.parity_model, args.parity_steps), timeout=7200)[0]
        parity["model"], parity["steps"] = args.parity_model, args.parity_steps
        (out / "bench_gradient_parity.json").write_text(json.dumps(parity, indent=1))
        _plot_parity(parity, out / "bench_gradient_parity.png")
        print(f"parity ({time.time() - t0:.0f} s), {args.parity_steps} steps of {args.parity_model}:")
        for name, *_ in PARITY_RUNS:
            run = parity[name]
            print(f"  {name:22s} final train loss {run['final_train']:.4f}  held-out {run['heldout']:.4f}")
        for key, ratio in parity.items():
            if "_vs_" in key:
                print(f"  {key:45s} train x{ratio['final_train']:.4f}  held-out x{ratio['heldout']:.4f}")
        results["parity"] = parity
    return results


def _print_summary(results: dict[str, Any]) -> None:
    for world, r in results["reduction"].items():
        print(f"{results['model']} ({r['numel']:,} elements), {world} ranks:")
        for m in ("fp32", "bf16", "8bit", "8bit_allreduce"):
            x = r[m]
            print(
                f"  {m:15s} {x['bytes'] / 2**20:8.2f} MiB  x{x['bytes'] / r['fp32']['bytes']:.3f} of fp32  "
                f"x{x['bytes'] / r['bf16']['bytes']:.3f} of bf16  rel.err {x['rel_error']:.2e}  "
                f"{x['seconds'] * 1e3:7.1f} ms (loopback)  {x['wire_ms_at_10gbit']:6.1f} ms on the wire at 10 Gbit/s"
            )
        b = r["buffer"]["zero2_partition"]
        print(
            f"  ZeRO-2 buffer: fp32 {b['fp32'] / 2**20:.2f} MiB, int8 {b['int8'] / 2**20:.2f} MiB "
            f"(x{b['int8'] / b['fp32']:.3f}), EF residual {r['buffer']['ef_residual_zero2'] / 2**20:.2f} MiB"
        )
        for name, e in results["engine"][world].items():
            st = e["stats"]
            extra = (
                f" agoq comm {st['comm_bytes'] / 2**20:.2f} MiB/step (x{st['comm_bytes_ratio_bf16']:.3f} of bf16), "
                f"buffer x{st['buffer_bytes_ratio_fp32']:.3f} of fp32"
                if st
                else ""
            )
            print(
                f"  engine {name:12s} all-reduce {e['allreduce_bytes_per_step'] / 2**20:.2f} MiB/step, "
                f"{e['seconds_per_step']:.2f} s/step{extra}"
            )


if __name__ == "__main__":
    main()
