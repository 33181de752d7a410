"""ZeRO-Offload with 8-bit gradients: step time and device<->host gradient bytes, stock versus agoq (issue 24).

Each configuration (ZeRO-2 with ``offload_optimizer: cpu``; ZeRO-3 with ``offload_optimizer`` and
``offload_param: cpu``, as in HF's DeepSpeed guide; gradient accumulation 1 and 8) trains the 10M
LLaMA on the embedded corpus with 2 gloo ranks and DeepSpeed's CPU Adam, stock and with ``"agoq": {}``,
each in its own processes: ``--warmup`` steps, then ``--steps`` timed ones (median reported).

Gradient bytes per step: agoq's meter (``gradient/offload_bytes``: what crossed, int8 codes and
scales once per step) and its figure for DeepSpeed's own offload path on the same gradients
(``gradient/offload_bytes_baseline``; it equals the copies DeepSpeed issues, counted on CPU by
``tests/gradient/test_offload.py``). On a CPU "device" and "host" are the same memory: the bytes are
counts, not PCIe times, and device memory cannot be told apart from host memory (``agoq-ds plan``
gives both). Held-out loss over the paired 1000-step design: ``convergence.py --offload cpu``.

    python benchmarks/offload.py                                     # 10M, seq 256, 4 configurations
    python benchmarks/offload.py --model tiny --seq-len 32 --steps 2 --out results/offload_smoke.json
    DS_ACCELERATOR=cuda python benchmarks/offload.py --world-size 1 --model 76m --seq-len 1024 --configs 3:1 3:8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if not __package__:  # run as a script (python benchmarks/x.py): the repository root holds the benchmarks package
    sys.path.append(str(ROOT))

from benchmarks._machine import machine_info, write_results  # noqa: E402

CONFIGS = tuple((stage, ga) for stage in (2, 3) for ga in (1, 8))
"""(ZeRO stage, gradient accumulation steps)."""


def ds_config(stage: int, ga: int, micro: int, bf16: bool, agoq: bool) -> dict:
    """ZeRO-Offload at ``stage`` (at ZeRO-3 parameters offloaded too), DeepSpeed's CPU Adam."""
    zero: dict = {"stage": stage, "offload_optimizer": {"device": "cpu", "pin_memory": True}}
    if stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": ga,
        "steps_per_print": 10_000,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
    }
    if agoq:
        config["agoq"] = {"log_summary": False}
    return config


def run_config(rank: int, world: int, shape: str, seq: int, config: dict, warmup: int, steps: int) -> dict:
    """Train one configuration; step times (s) of the timed steps, losses, agoq's gradient figures."""
    import deepspeed

    from agoq_ds.testing.data import batches, load_bytes, split
    from agoq_ds.testing.models import build_llama

    model = build_llama(shape, seed=0)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    train, _ = split(load_bytes(max_bytes=400_000))
    stream = batches(train, config["train_micro_batch_size_per_gpu"], seq, seed=7, rank=rank, world_size=world)
    times, losses, stats = [], [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        total = 0.0
        for _ in range(config["gradient_accumulation_steps"]):
            batch = next(stream).to(engine.device)
            loss = engine(input_ids=batch, labels=batch).loss
            engine.backward(loss)
            engine.step()
            total += loss.detach().item()
        losses.append(total / config["gradient_accumulation_steps"])
        if i >= warmup:
            times.append(time.perf_counter() - start)
            if hasattr(engine, "agoq_stats"):
                stats.append(engine.agoq_stats())
    out: dict = {"step_s": times, "losses": losses, "optimizer": type(engine.optimizer).__name__}
    if stats:
        keys = ("gradient/offload_bytes", "gradient/offload_bytes_baseline", "gradient/comm_bytes")
        out.update({key.split("/")[1]: statistics.fmean(s[key] for s in stats) for key in keys})
        out["avg_bits"] = stats[-1]["activation/avg_bits"]
    engine.destroy()
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run every configuration, stock and agoq, and write the JSON and a chart."""
    from agoq_ds.testing.distributed import run_ranks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="10m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--world-size", type=int, default=2, help="data-parallel ranks (CPU processes or GPUs)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--configs", nargs="*", default=[f"{s}:{g}" for s, g in CONFIGS], help="STAGE:GA pairs (default: all four)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "offload.json")
    args = parser.parse_args(argv)
    rows = []
    for stage, ga in (tuple(int(v) for v in pair.split(":")) for pair in args.configs):
        row: dict = {"stage": stage, "grad_accum": ga}
        for label, agoq in (("stock", False), ("agoq", True)):
            config = ds_config(stage, ga, args.micro, args.dtype == "bf16", agoq)
            run, _ = run_ranks(run_config, 2, (args.model, args.seq_len, config, args.warmup, args.steps), timeout=3600)
            run["median_step_s"] = statistics.median(run["step_s"])
            row[label] = run
        agoq_run = row["agoq"]
        row["step_time_ratio"] = agoq_run["median_step_s"] / row["stock"]["median_step_s"]
        row["offload_bytes_ratio"] = agoq_run["offload_bytes"] / agoq_run["offload_bytes_baseline"]
        print(
            f"ZeRO-{stage} GA {ga}: step {row['stock']['median_step_s'] * 1e3:.0f} -> "
            f"{agoq_run['median_step_s'] * 1e3:.0f} ms ({row['step_time_ratio']:.3f}x), gradient bytes to the host "
            f"{agoq_run['offload_bytes_baseline'] / 2**20:.2f} -> {agoq_run['offload_bytes'] / 2**20:.2f} MiB "
            f"({row['offload_bytes_ratio']:.3f}x)",
            flush=True,
        )
        rows.append(row)
    result = {
        "command": "python benchmarks/offload.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "shape": {
            "model": args.model,
            "seq_len": args.seq_len,
            "micro_batch": args.micro,
            "dtype": args.dtype,
            "world_size": args.world_size,
        },
        "rows": rows,
        "note": "CPU ranks: device and host are the same memory; bytes are counts, not PCIe times",
    }
    write_results(result, args.out, chart)
    return result


def chart(result: dict, path: Path) -> None:
    """Per configuration: gradient bytes to the host and median step time, stock and agoq."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [f"ZeRO-{r['stage']}\nGA {r['grad_accum']}" for r in rows]
    x = range(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    stock_bytes = [r["agoq"]["offload_bytes_baseline"] / 2**20 for r in rows]
    agoq_bytes = [r["agoq"]["offload_bytes"] / 2**20 for r in rows]
    left.bar([i - 0.2 for i in x], stock_bytes, 0.4, label="stock DeepSpeed", color="grey")
    left.bar([i + 0.2 for i in x], agoq_bytes, 0.4, label="agoq", color="tab:green")
    for i, r in enumerate(rows):
        left.text(i + 0.2, agoq_bytes[i], f"{r['offload_bytes_ratio']:.2f}x", ha="center", va="bottom")
    left.set_xticks(list(x), names)
    left.set_ylabel("gradient bytes device<->host per step (MiB)")
    left.legend()
    stock_ms = [r["stock"]["median_step_s"] * 1e3 for r in rows]
    agoq_ms = [r["agoq"]["median_step_s"] * 1e3 for r in rows]
    right.bar([i - 0.2 for i in x], stock_ms, 0.4, label="stock DeepSpeed", color="grey")
    right.bar([i + 0.2 for i in x], agoq_ms, 0.4, label="agoq", color="tab:green")
    right.set_xticks(list(x), names)
    right.set_ylabel("median step time (ms, CPU ranks)")
    right.legend()
    shape = result["shape"]
    ranks = shape.get("world_size", 2)
    fig.suptitle(f"ZeRO-Offload, LLaMA {shape['model']}, seq {shape['seq_len']}, {shape['dtype']}, {ranks} ranks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
