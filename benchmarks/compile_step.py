"""Step time under ``engine.compile()``: stock and agoq, eager and compiled, side by side (issue 26).

Each configuration trains an HF LLaMA in a real DeepSpeed engine (ZeRO-2, one gloo rank, fp32 on the
CPU) in its own process, one after the other: ``--warmup`` steps (agoq's first step runs eager to
classify the model; compilation happens in the first compiled step) then ``--steps`` timed steps
(the median is reported). Ratios: compiled agoq over eager agoq (issue 26 target <= 1.0) and over
compiled stock (target <= 1.10 on CPU). Stored activation bytes per forward are agoq's own count (for
the compiled run, what the compiled graphs saved). GPU figures come from ``benchmarks/gpu_step.py``.

    python benchmarks/compile_step.py                                  # bench shape, seq 256
    python benchmarks/compile_step.py --model tiny --seq-len 64 --steps 3 --out results/compile_step_smoke.json
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

CONFIGS = (
    ("stock", False, False),
    ("stock compiled", False, True),
    ("agoq", True, False),
    ("agoq compiled", True, True),
)
"""(name, agoq block, engine.compile())."""


def run_config(
    rank: int, world: int, shape: str, seq: int, micro: int, agoq: bool, compile_: bool, warmup: int, steps: int
) -> dict:
    """Train one configuration; step times (s) of the timed steps and agoq's stored bytes."""
    import deepspeed
    import torch

    from agoq_ds.testing.data import batches, load_bytes, split
    from agoq_ds.testing.models import build_llama

    torch._dynamo.reset()
    model = build_llama(shape, seed=0)
    config: dict = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10_000,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": 2},
    }
    if agoq:
        config["agoq"] = {"log_summary": False}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    if compile_:
        engine.compile()
    train, _ = split(load_bytes(max_bytes=400_000))
    stream = batches(train, micro, seq, seed=7)
    times, losses = [], []
    for i in range(warmup + steps):
        batch = next(stream)
        start = time.perf_counter()
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach().item())
        if i >= warmup:
            times.append(time.perf_counter() - start)
    out = {"step_s": times, "losses": losses}
    if agoq:
        stats = engine.agoq_stats()
        out["stored_bytes_per_forward"] = stats["activation/stored_bytes_per_forward"]
        out["compiled_runs"] = stats.get("activation/compiled_runs", 0.0)
    engine.destroy()
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run every configuration and write the JSON (and a chart)."""
    from agoq_ds.testing.distributed import run_ranks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "compile_step.json")
    args = parser.parse_args(argv)
    runs = {}
    for name, agoq, compile_ in CONFIGS:
        print(f"{name} ...", flush=True)
        (runs[name],) = run_ranks(
            run_config,
            1,
            (args.model, args.seq_len, args.micro, agoq, compile_, args.warmup, args.steps),
            timeout=3600,
        )
        runs[name]["median_step_s"] = statistics.median(runs[name]["step_s"])
        print(f"  median step {runs[name]['median_step_s'] * 1e3:.1f} ms", flush=True)
    median = {name: run["median_step_s"] for name, run in runs.items()}
    result = {
        "command": "python benchmarks/compile_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "shape": {"model": args.model, "seq_len": args.seq_len, "micro_batch": args.micro},
        "runs": runs,
        "ratios": {
            "agoq_compiled_vs_agoq_eager": median["agoq compiled"] / median["agoq"],
            "agoq_compiled_vs_stock_compiled": median["agoq compiled"] / median["stock compiled"],
            "agoq_eager_vs_stock_eager": median["agoq"] / median["stock"],
            "stock_compiled_vs_stock_eager": median["stock compiled"] / median["stock"],
            "stored_bytes_compiled_vs_eager": runs["agoq compiled"]["stored_bytes_per_forward"]
            / runs["agoq"]["stored_bytes_per_forward"],
        },
    }
    for key, value in result["ratios"].items():
        print(f"{key}: {value:.3f}")
    write_results(result, args.out, chart)
    return result


def chart(result: dict, path: Path) -> None:
    """Median step time of each configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["runs"])
    values = [result["runs"][n]["median_step_s"] * 1e3 for n in names]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(names, values, color=["grey", "dimgrey", "tab:green", "tab:blue"])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.0f} ms", ha="center", va="bottom")
    shape = result["shape"]
    ax.set_ylabel("median step time (ms)")
    ax.set_title(f"engine.compile() on CPU: LLaMA {shape['model']}, seq {shape['seq_len']}, ZeRO-2")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
