"""Saved-activation memory and step time of layer-aware activation quantization, plus a short
training comparison.

Part 1 (memory/time): HF ``LlamaForCausalLM`` (``build_llama("bench")``: 4 layers, hidden 512,
8 heads, MLP 1376; bf16), sequences of 512 tokens of real text. For no quantization, the AGoQ
default policy, uniform 8-bit, uniform 4-bit and budget mode at 4.0 bits it reports the exact bytes
autograd keeps for backward (counted per saved tensor by agoq's ledger: codes + scales for quantized
tensors, the tensor's own bytes otherwise; parameters excluded) against what the unquantized bf16
model keeps, and the forward+backward step time relative to the model without hooks. Timed steps
run round-robin over the configurations so drift on a shared machine hits all alike; ratios use
each configuration's best step (medians are kept in the JSON too).

Part 2 (training, ``--train-steps``, 0 to skip): ``build_llama("tiny")`` trained from the same
init on the same batches of the embedded text corpus with AdamW, without quantization, with the
default policy and with uniform 2-bit; reports the mean train loss of the last 50 steps and the
held-out loss.

    python benchmarks/bench_activation.py                          # both parts, JSON + PNG
    python benchmarks/bench_activation.py --steps 2 --train-steps 0 --out /tmp/b.json   # smoke run

Writes ``--out`` (JSON, default results/bench_activation.json) and a chart next to it (``.png``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch

from agoq_ds.activation import ActivationQuantizer
from agoq_ds.config import ActivationConfig
from agoq_ds.testing.data import batches, heldout_batches, load_bytes, split
from agoq_ds.testing.models import build_llama

MEMORY_CONFIGS: dict[str, ActivationConfig | None] = {
    "none": None,
    "agoq default": ActivationConfig(),
    "uniform 8-bit": ActivationConfig(policy="uniform", default_bits=8),
    "uniform 4-bit": ActivationConfig(policy="uniform", default_bits=4),
    "budget 4.0 bits": ActivationConfig(budget={"target_avg_bits": 4.0}),
}
"""Configurations of part 1 (``None``: no quantizer)."""

TRAIN_CONFIGS: dict[str, ActivationConfig | None] = {
    "none": None,
    "agoq default": ActivationConfig(),
    "uniform 2-bit": ActivationConfig(policy="uniform", default_bits=2),
}
"""Configurations of part 2."""


def step(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """One forward + backward; returns its wall time in seconds."""
    start = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def memory_and_time(batch: int, seq: int, steps: int) -> dict:
    """Part 1: bytes per configuration (second step, after tracing/calibration) and step times."""
    model = build_llama("bench", dtype=torch.bfloat16).train()
    train, _ = split(load_bytes())
    ids = next(batches(train, batch, seq, seed=0))
    # Exact unquantized bytes: the ledger with every class at 16 bits and nothing recomputed.
    counter = ActivationQuantizer(model, ActivationConfig(policy="uniform", default_bits=16, recompute=False))
    quantizers = {"none": counter.install()}
    step(model, ids)
    counter.on_step_end()
    counter.remove()
    for name, config in MEMORY_CONFIGS.items():
        if config is None:
            continue
        quantizers[name] = q = ActivationQuantizer(model, config).install()
        for _ in range(config.budget.calibration_steps + 1 if name.startswith("budget") else 1):
            step(model, ids)  # traced / calibration step(s)
            q.on_step_end()
        step(model, ids)
        q.on_step_end()
        q.remove()
    times: dict[str, list[float]] = {name: [] for name in MEMORY_CONFIGS}
    step(model, ids)  # warm up the plain model too
    for _ in range(steps):
        for name, config in MEMORY_CONFIGS.items():
            q = quantizers[name] if config is not None else None
            if q is not None:
                q.install()
            times[name].append(step(model, ids))
            if q is not None:
                q.on_step_end()
                q.remove()
    base = counter.stats()
    base_time = min(times["none"])
    rows = {}
    for name, q in quantizers.items():
        s = q.stats()
        stored = s["stored_bytes_peak"] if name != "none" else base["baseline_bytes_peak"]
        rows[name] = {
            "stored_bytes": int(stored),
            "ratio_vs_bf16_model": stored / base["baseline_bytes_peak"],
            "ratio_vs_bf16_elements": stored / base["bf16_bytes_peak"],
            "avg_bits": 8 * stored / base["elements_per_forward"],
            "step_s": min(times[name]),
            "step_s_median": statistics.median(times[name]),
            "step_time_vs_none": min(times[name]) / base_time,
            "table": q.table() if name != "none" else {},
            "report": q.report(per_layer=True) if name != "none" else counter.report(),
        }
    return {
        "model": "build_llama('bench'): LlamaForCausalLM, 4 layers, hidden 512, 8 heads, MLP 1376, bf16, SDPA",
        "batch": batch,
        "seq": seq,
        "timed_steps": steps,
        "baseline_bytes": int(base["baseline_bytes_peak"]),
        "baseline_elements": int(base["elements_per_forward"]),
        "configs": rows,
    }


def train(config: ActivationConfig | None, steps: int, batch: int, seq: int) -> dict:
    """Part 2: one training run; loss curve, last-50 mean and held-out loss."""
    torch.manual_seed(0)
    model = build_llama("tiny", seed=0).train()
    quantizer = ActivationQuantizer(model, config).install() if config is not None else None
    train_tokens, held = split(load_bytes())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    data = batches(train_tokens, batch, seq, seed=0)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        x = next(data)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if quantizer is not None:
            quantizer.on_step_end()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    stats = quantizer.stats() if quantizer is not None else {}
    if quantizer is not None:
        quantizer.remove()
    model.eval()
    with torch.no_grad():
        held_batches = heldout_batches(held, batch, seq, 8)
        heldout = sum(model(input_ids=b, labels=b).loss.item() for b in held_batches) / len(held_batches)
    tail = losses[-50:]
    return {
        "losses": losses,
        "train_loss_last50": sum(tail) / len(tail),
        "heldout_loss": heldout,
        "avg_bits": stats.get("avg_bits"),
        "seconds": seconds,
    }


def training(steps: int, batch: int, seq: int) -> dict:
    """Part 2 for every configuration, with losses relative to no quantization."""
    runs = {name: train(cfg, steps, batch, seq) for name, cfg in TRAIN_CONFIGS.items()}
    base = runs["none"]
    for run in runs.values():
        run["train_vs_none"] = run["train_loss_last50"] / base["train_loss_last50"] - 1
        run["heldout_vs_none"] = run["heldout_loss"] / base["heldout_loss"] - 1
    return {
        "model": "build_llama('tiny'): 2 layers, hidden 128, fp32",
        "steps": steps,
        "batch": batch,
        "seq": seq,
        "optimizer": "AdamW lr 2e-3",
        "runs": runs,
    }


def chart(result: dict, path: Path) -> None:
    """Bar chart of stored bytes (and step time), plus loss curves when part 2 ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mem = result["memory"]["configs"]
    parts = 2 if "training" in result else 1
    fig, axes = plt.subplots(1, parts + 1, figsize=(6 * (parts + 1), 4.5))
    names = list(mem)
    ax = axes[0]
    ratios = [mem[n]["ratio_vs_bf16_model"] for n in names]
    bars = ax.bar(names, ratios, color=["grey", "tab:green", "tab:blue", "tab:orange", "tab:purple"])
    for bar, n in zip(bars, names, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{mem[n]['avg_bits']:.2f} b/el", ha="center")
    ax.axhline(0.30, color="red", linestyle="--", linewidth=1, label="target 0.30x")
    ax.set_ylabel("saved-activation bytes / unquantized bf16 model")
    ax.set_title("exact saved-activation bytes (LLaMA bench, bf16)")
    ax.tick_params(axis="x", rotation=20)
    ax.legend()
    ax = axes[1]
    ax.bar(names, [mem[n]["step_time_vs_none"] for n in names], color="tab:cyan")
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_ylabel("step time / no quantization")
    ax.set_title("forward+backward time (best of the timed steps)")
    ax.tick_params(axis="x", rotation=20)
    if parts == 2:
        ax = axes[2]
        for name, run in result["training"]["runs"].items():
            windows = [run["losses"][max(0, i - 19) : i + 1] for i in range(len(run["losses"]))]
            ax.plot([sum(w) / len(w) for w in windows], label=f"{name} (held-out {run['heldout_loss']:.3f})")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (20-step mean)")
        ax.set_title("training, tiny LLaMA on text")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write JSON + PNG."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2, help="sequences per step (part 1)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence (part 1)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (part 1)")
    parser.add_argument("--train-steps", type=int, default=300, help="training steps (part 2; 0 skips it)")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_activation.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "memory": memory_and_time(args.batch, args.seq, args.steps),
    }
    mem = result["memory"]
    print(f"saved activations, {mem['model']}, batch {args.batch} x seq {args.seq}")
    print(f"{'config':18s} {'stored MiB':>10s} {'vs bf16':>8s} {'bits/el':>8s} {'step s':>8s} {'vs none':>8s}")
    for name, row in mem["configs"].items():
        print(
            f"{name:18s} {row['stored_bytes'] / 2**20:10.2f} {row['ratio_vs_bf16_model']:7.3f}x "
            f"{row['avg_bits']:8.2f} {row['step_s']:8.3f} {row['step_time_vs_none']:7.2f}x"
        )
    print(mem["configs"]["agoq default"]["report"])
    if args.train_steps:
        result["training"] = training(args.train_steps, args.train_batch, args.train_seq)
        print(f"training {result['training']['model']}, {args.train_steps} steps")
        for name, run in result["training"]["runs"].items():
            print(
                f"{name:18s} train(last 50) {run['train_loss_last50']:.4f} ({run['train_vs_none']:+.2%})  "
                f"held-out {run['heldout_loss']:.4f} ({run['heldout_vs_none']:+.2%})  {run['seconds']:.0f}s"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    chart(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
