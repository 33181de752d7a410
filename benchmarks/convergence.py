"""Convergence: stock DeepSpeed versus agoq and its ablations, same seed, same data, same model.

A LLaMA-architecture HF model of about 10M parameters (``build_llama("10m")``: 6 layers, hidden 384,
6 heads, 2 KV heads, MLP 1024, byte-level vocabulary) is pretrained from the same initialisation on
the same batches of the embedded text corpus (Python standard-library source) with 2 CPU ranks,
DeepSpeed ZeRO-2, bf16, AdamW with warm-up + cosine decay, once per variant:

=====================  ===========================================================================
stock                  no ``"agoq"`` block: stock DeepSpeed engine and ZeRO-2 optimizer
agoq                   ``"agoq": {}``: default activation policy + 8-bit gradient storage/communication
activations only       agoq activation policy, ``gradient.enabled: false``
gradients only         8-bit gradients, ``activation.enabled: false``
uniform 4-bit act.     every saved activation class at 4 bits, gradients unquantized
uniform 2-bit act.     every saved activation class at 2 bits, gradients unquantized
stock, other seed      (``--extras stock_seed``) stock with seed + 1: run-to-run spread of stock
stock, fp32 gradients  (``--extras stock_fp32grad``) stock accumulating/reducing gradients in fp32
=====================  ===========================================================================

Each variant is one ``deepspeed --num_accelerators 2 examples/pretrain_llama.py`` run (the real
launcher, real engines, gloo), so the benchmark trains exactly what a user's script would. Results:
``<out>/convergence.json`` (curves + summary + machine), ``<out>/convergence.png``, and per variant
``<out>/runs/<slug>.json`` (the example's record), ``<out>/configs/<slug>.json`` (the exact ds_config)
and ``<out>/logs/<slug>.log``. Target: agoq's final held-out loss within 1% of stock's.

    python benchmarks/convergence.py                                   # full run (long on 2 cores)
    python benchmarks/convergence.py --model tiny --steps 3 --seq-len 32 --out /tmp/c   # smoke run
    python benchmarks/convergence.py --reuse          # finish an interrupted run (keeps finished variants)
    python benchmarks/convergence.py --snapshot       # train git HEAD's code while the checkout is edited
    python benchmarks/convergence.py --offload cpu    # every variant, stock too, with ZeRO-Offload
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if not __package__:  # run as a script (python benchmarks/x.py): the repository root holds the benchmarks package
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from benchmarks._machine import ROOT, describe, load_average, machine_info, snapshot

EXAMPLE = ROOT / "examples" / "pretrain_llama.py"
BASE_CONFIG = ROOT / "ds_configs" / "zero2_baseline.json"
TARGET_REL = 0.01
"""agoq's final held-out loss may be at most this much (relative) above stock's (with ``--seeds``:
the mean paired gap)."""
TARGET_CI_UPPER = 0.015
"""With ``--seeds``: the upper end of the mean paired gap's 95% interval may be at most this."""


@dataclass(frozen=True)
class Variant:
    """One training run of the comparison."""

    slug: str
    """File-name-safe key."""
    name: str
    """Display name."""
    agoq: dict | None
    """The ``"agoq"`` block (``None``: stock DeepSpeed, no block)."""
    seed_offset: int = 0
    """Added to ``--seed`` (model initialisation and data order)."""
    ds_overrides: dict | None = None
    """Top-level ds_config keys this variant sets (beyond the ``"agoq"`` block)."""


VARIANTS: tuple[Variant, ...] = (
    Variant("stock", "stock", None),
    Variant("agoq", "agoq", {}),
    Variant("act_only", "activations only", {"gradient": {"enabled": False}}),
    Variant("grad_only", "gradients only", {"activation": {"enabled": False}}),
    Variant(
        "uniform4",
        "uniform 4-bit act.",
        {"activation": {"policy": "uniform", "default_bits": 4}, "gradient": {"enabled": False}},
    ),
    Variant(
        "uniform2",
        "uniform 2-bit act.",
        {"activation": {"policy": "uniform", "default_bits": 2}, "gradient": {"enabled": False}},
    ),
)
"""The comparison, in run order."""

EXTRAS: dict[str, Variant] = {
    "stock_seed": Variant("stock_seed", "stock, other seed", None, seed_offset=1),
    "stock_fp32grad": Variant(
        "stock_fp32grad",
        "stock, fp32 gradients",
        None,
        ds_overrides={"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"},
    ),
}
"""Optional references (``--extras``): stock with another seed (how far two equally good stock runs
land apart) and stock with fp32 gradient accumulation and reduction (DeepSpeed's bf16 default
accumulates and all-reduces gradients in bf16)."""


def custom_variant(spec: str) -> Variant:
    """A ``--agoq SLUG=JSON`` variant: agoq with that ``"agoq"`` block."""
    slug, sep, block = spec.partition("=")
    if not sep or not slug.isidentifier():
        raise argparse.ArgumentTypeError(f"expected SLUG=JSON with SLUG a plain name, got {spec!r}")
    try:
        agoq = json.loads(block)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{slug}: the agoq block is not JSON: {e}") from e
    if not isinstance(agoq, dict):
        raise argparse.ArgumentTypeError(f"{slug}: the agoq block must be a JSON object")
    return Variant(slug, slug, agoq)


def ds_config(variant: Variant, args: argparse.Namespace) -> dict:
    """The ds_config of ``variant``: ``ds_configs/zero2_baseline.json`` with this run's batch, steps
    and schedule, plus the variant's ``"agoq"`` block."""
    cfg = json.loads(BASE_CONFIG.read_text())
    if getattr(args, "dtype", "bf16") == "fp32":
        cfg["bf16"] = {"enabled": False}
    if getattr(args, "offload", "none") != "none":  # ZeRO-Offload: DeepSpeed's CPU Adam steps on the host
        cfg["zero_optimization"]["offload_optimizer"] = {"device": args.offload}
        cfg["optimizer"]["params"].pop("torch_adam", None)
    cfg["train_micro_batch_size_per_gpu"] = args.micro_batch
    cfg["gradient_accumulation_steps"] = args.grad_accum
    cfg["steps_per_print"] = 10**6
    cfg["optimizer"]["params"]["lr"] = args.lr
    cfg["scheduler"]["params"]["total_num_steps"] = args.steps
    cfg["scheduler"]["params"]["warmup_num_steps"] = max(1, round(args.steps * args.warmup))
    cfg.update(copy.deepcopy(variant.ds_overrides or {}))
    if variant.agoq is not None:
        cfg["agoq"] = copy.deepcopy(variant.agoq)
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(config: Path, variant: Variant, args: argparse.Namespace, out: Path) -> list[str]:
    """``deepspeed --num_accelerators 2 examples/pretrain_llama.py ...`` for one variant."""
    example = args.code / "examples" / EXAMPLE.name if args.code is not None else EXAMPLE
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_accelerators",
        str(args.world_size),
        "--master_port",
        str(_free_port()),  # other jobs on this machine may hold the default port
        str(example),
        "--deepspeed_config",
        str(config),
        "--model",
        args.model,
        "--steps",
        str(args.steps),
        "--seq-len",
        str(args.seq_len),
        "--seed",
        str(args.seed + variant.seed_offset),
        "--eval-every",
        str(args.eval_every),
        "--eval-batches",
        str(args.eval_batches),
        "--label",
        variant.name,
        "--out",
        str(out),
    ]


def run_variant(variant: Variant, args: argparse.Namespace) -> dict:
    """Train one variant with the deepspeed launcher; returns the example's record plus run metadata."""
    for sub in ("configs", "runs", "logs"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    config = args.out / "configs" / f"{variant.slug}.json"
    config.write_text(json.dumps(ds_config(variant, args), indent=1))
    record_path = args.out / "runs" / f"{variant.slug}.json"
    log_path = args.out / "logs" / f"{variant.slug}.log"
    if args.reuse and record_path.exists():
        record = json.loads(record_path.read_text())
        if record.get("settings") == settings(args, variant):
            return record
    cmd = launcher_command(config, variant, args, record_path)
    env = {**os.environ, "DS_ACCELERATOR": args.device, "OMP_NUM_THREADS": str(args.threads)}
    if args.code is not None:  # the snapshot shadows the editable install
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.code), env.get("PYTHONPATH")]))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    load_before = load_average()
    start = time.perf_counter()
    with log_path.open("w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0 or not record_path.exists():
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise RuntimeError(f"{variant.name}: launcher exited {proc.returncode}; log {log_path}:\n{tail}")
    record = json.loads(record_path.read_text())
    record.update(
        slug=variant.slug,
        name=variant.name,
        agoq_block=variant.agoq,
        seed=args.seed + variant.seed_offset,
        settings=settings(args, variant),
        wall_s=time.perf_counter() - start,
        load_average_before=load_before,
        load_average_after=load_average(),
        command=" ".join(cmd[1:]).replace("-m deepspeed.launcher.runner", "deepspeed"),
    )
    record_path.write_text(json.dumps(record, indent=1))
    return record


STOCK_CODE = (
    "examples/pretrain_llama.py",
    "agoq_ds/testing/data.py",
    "agoq_ds/testing/models.py",
    "agoq_ds/testing/stats.py",
)
"""What a stock run executes of this repository (model, data, loop, meters): a stock run is reused
across code versions that agree on these files."""


def settings(args: argparse.Namespace, variant: Variant) -> dict:
    """The run settings that must agree for a finished variant to be reused."""
    keys = ("model", "steps", "seq_len", "micro_batch", "grad_accum", "lr", "seed", "eval_every", "eval_batches")
    if args.warmup != 0.05:
        keys += ("warmup",)
    extra = {"world_size": args.world_size, "threads": args.threads, "code": str(args.code)}
    if getattr(args, "offload", "none") != "none":
        extra["offload"] = args.offload
    if getattr(args, "dtype", "bf16") != "bf16":
        extra["dtype"] = args.dtype
    if args.device != "cpu":
        extra["device"] = args.device
    if variant.agoq is None:
        root = args.code or ROOT
        digest = hashlib.sha256(b"".join((Path(root) / f).read_bytes() for f in STOCK_CODE)).hexdigest()[:16]
        extra["code"] = f"stock {digest}"
    return {k: getattr(args, k) for k in keys} | extra


def _tail_mean(values: list[float], window: int) -> float:
    return statistics.fmean(values[-window:])


def summarize(runs: dict[str, dict], tail: int = 20) -> dict[str, dict]:
    """Per variant: final and last-3 held-out loss, train loss (mean of the last ``tail`` steps), each
    relative to stock; stored activation bytes, gradient-buffer bytes, bytes sent per step, step time."""
    stock = runs["stock"]
    stock_final = stock["heldout"][-1][1]
    stock_last3 = statistics.fmean(h for _, h in stock["heldout"][-3:])
    stock_train = _tail_mean(stock["loss"], tail)
    rows = {}
    for slug, run in runs.items():
        final = run["heldout"][-1][1]
        last3 = statistics.fmean(h for _, h in run["heldout"][-3:])
        train = _tail_mean(run["loss"], tail)
        agoq_stats = run.get("agoq_stats", {})
        act_bytes = statistics.median(run["activation_bytes_per_micro_batch"][1:] or [0])
        quantized = "activation/avg_bits" in agoq_stats
        if not quantized:  # activations kept as they are: what stock autograd saves
            act_bytes = statistics.median(stock["activation_bytes_per_micro_batch"][1:] or [0])
        rows[slug] = {
            "name": run["name"],
            "heldout_final": final,
            "heldout_final_vs_stock": final / stock_final - 1,
            "heldout_last3": last3,
            "heldout_last3_vs_stock": last3 / stock_last3 - 1,
            f"train_last{tail}": train,
            f"train_last{tail}_vs_stock": train / stock_train - 1,
            "activation_bytes_per_micro_batch": act_bytes,
            "activation_avg_bits": agoq_stats.get("activation/avg_bits") if quantized else None,
            "gradient_buffer_bytes": statistics.median(run["gradient_buffer_bytes"][1:] or [0]),
            "comm_bytes_per_step": statistics.median(run["comm_bytes_per_step"][1:] or [0]),
            "step_time_s_median": statistics.median(run["step_time_s"][1:] or run["step_time_s"]),
            "wall_s": run.get("wall_s"),
            "load_average_after": run.get("load_average_after"),
        }
    return rows


T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)
"""Two-sided 95% quantiles of Student's t for 1..15 degrees of freedom."""


def paired_gaps(runs_by_seed: list[dict[str, dict]]) -> dict[str, dict]:
    """Per variant, the final held-out loss relative to stock's *of the same seed* (same
    initialisation and batches), over the seeds: each gap, their mean and its 95% interval."""
    out = {}
    for slug in runs_by_seed[0]:
        if slug == "stock":
            continue
        gaps = [runs[slug]["heldout"][-1][1] / runs["stock"]["heldout"][-1][1] - 1 for runs in runs_by_seed]
        mean = statistics.fmean(gaps)
        half = T_975[len(gaps) - 2] * statistics.stdev(gaps) / len(gaps) ** 0.5 if len(gaps) > 1 else float("nan")
        out[slug] = {
            "name": runs_by_seed[0][slug]["name"],
            "gaps": gaps,
            "mean": mean,
            "ci95": [mean - half, mean + half],
            "seeds": len(gaps),
        }
    return out


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(
    runs: dict[str, dict], summary: dict[str, dict], path: Path, title: str, paired: dict[str, dict] | None = None
) -> None:
    """Train loss (moving average), held-out loss, and final held-out loss relative to stock (with
    ``paired``: the mean paired gap over the seeds and its 95% interval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    colors = dict(zip(runs, plt.get_cmap("tab10").colors, strict=False))
    window = max(1, len(runs["stock"]["loss"]) // 30)
    for slug, run in runs.items():
        style = "--" if slug.startswith("stock") else "-"
        steps = range(1, len(run["loss"]) + 1)
        axes[0].plot(steps, smooth(run["loss"], window), style, color=colors[slug], label=run["name"], lw=1.2)
        x, y = zip(*run["heldout"], strict=True)
        axes[1].plot(x, y, style + "o", color=colors[slug], label=run["name"], ms=3, lw=1.2)
    axes[0].set(xlabel="optimizer step", ylabel=f"train loss (nats/byte, {window}-step mean)", title="train loss")
    axes[1].set(xlabel="optimizer step", ylabel="held-out loss (nats/byte)", title="held-out loss")
    # Zoom the curves on the part where the variants are told apart.
    finals = [r["heldout"][-1][1] for r in runs.values()]
    for ax in axes[:2]:
        ax.set_ylim(min(finals) * 0.95, max(finals) * 1.6)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[2]
    slugs = list(summary)
    values = [100 * summary[s]["heldout_final_vs_stock"] for s in slugs]
    errors = None
    if paired:
        values = [0.0 if s == "stock" else 100 * paired[s]["mean"] for s in slugs]
        errors = [
            [0.0 if s == "stock" else values[i] - 100 * paired[s]["ci95"][0] for i, s in enumerate(slugs)],
            [0.0 if s == "stock" else 100 * paired[s]["ci95"][1] - values[i] for i, s in enumerate(slugs)],
        ]
    bars = ax.bar([summary[s]["name"] for s in slugs], values, color=[colors[s] for s in slugs], yerr=errors, capsize=4)
    for bar, v in zip(bars, values, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:+.2f}%", ha="center", va="bottom" if v >= 0 else "top")
    ax.axhspan(-100 * TARGET_REL, 100 * TARGET_REL, color="green", alpha=0.1, label="±1% of stock")
    ax.axhline(0, color="black", lw=0.8)
    seeds = f", mean of {next(iter(paired.values()))['seeds']} paired seeds, 95% interval" if paired else ""
    ax.set(ylabel="final held-out loss vs stock (%)", title=f"final held-out loss relative to stock{seeds}")
    ax.tick_params(axis="x", rotation=25)
    ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(summary: dict[str, dict], tail: int) -> None:
    """The summary as a rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="convergence: final figures (relative = variant / stock - 1)")
    cols = ("variant", "held-out", "vs stock", f"train (last {tail})", "vs stock", "act. bits", "act. MiB/mb")
    for col in (*cols, "grad buf MiB", "sent MiB/step", "step s"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for row in summary.values():
        table.add_row(
            row["name"],
            f"{row['heldout_final']:.4f}",
            f"{row['heldout_final_vs_stock']:+.2%}",
            f"{row[f'train_last{tail}']:.4f}",
            f"{row[f'train_last{tail}_vs_stock']:+.2%}",
            "-" if row["activation_avg_bits"] is None else f"{row['activation_avg_bits']:.2f}",
            f"{row['activation_bytes_per_micro_batch'] / 2**20:.2f}",
            f"{row['gradient_buffer_bytes'] / 2**20:.2f}",
            f"{row['comm_bytes_per_step'] / 2**20:.2f}",
            f"{row['step_time_s_median']:.2f}",
        )
    Console(width=160).print(table)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (defaults: the documented full run)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="10m", help="agoq_ds.testing.models shape (default: 10m, ~9.6M parameters)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per variant")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch per rank")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (then cosine to 10%%)")
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up, as a fraction of --steps")
    p.add_argument("--seed", type=int, default=1234, help="model initialisation and data order (all variants)")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="paired seeds: every variant and stock run with seed, seed+1, ...; the target is judged on the "
        "mean paired gap and its 95%% interval",
    )
    p.add_argument("--eval-every", type=int, default=20, help="held-out evaluation interval (steps)")
    p.add_argument("--eval-batches", type=int, default=32, help="held-out batches (micro-batch x ranks rows each)")
    p.add_argument("--world-size", type=int, default=2, help="data-parallel ranks (CPU processes or GPUs)")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="DeepSpeed accelerator of the ranks (cuda: one GPU per rank; see scripts/gpu_convergence.sh)",
    )
    p.add_argument("--threads", type=int, default=1, help="OMP/torch threads per rank")
    p.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        default="bf16",
        help="compute dtype of every variant (fp32 on CPUs without native bf16, where bf16 matmuls are slow)",
    )
    p.add_argument(
        "--offload",
        choices=("none", "cpu"),
        default="none",
        help="ZeRO-Offload for every variant, stock included (offload_optimizer.device; DeepSpeed's CPU Adam)",
    )
    p.add_argument("--variants", nargs="*", help="slugs to run (default: all); stock is always run")
    p.add_argument("--extras", nargs="*", default=[], choices=sorted(EXTRAS), help="optional reference runs")
    p.add_argument(
        "--agoq",
        nargs="*",
        default=[],
        metavar="SLUG=JSON",
        type=custom_variant,
        help='extra agoq variants with their "agoq" block, e.g. '
        'mlp4=\'{"activation": {"class_bits": {"mlp_act": 4}}}\'',
    )
    p.add_argument("--reuse", action="store_true", help="keep finished variants with identical settings")
    p.add_argument(
        "--snapshot",
        nargs="?",
        const="HEAD",
        metavar="REV",
        help="run a commit's code (default HEAD) from a snapshot, not the (changing) checkout",
    )
    p.add_argument("--out", type=Path, default=ROOT / "results" / "convergence", help="output directory")
    p.add_argument("--plot", type=Path, help="PNG path (default: <out>/convergence.png)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run every variant, write the summary JSON and the plot; returns 0 (a missed target is reported)."""
    args = parse_args(argv)
    command = "python benchmarks/convergence.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.code, code = None, {"source": "checkout"}
    if args.snapshot:
        args.code, commit = snapshot(args.snapshot)
        code = {"source": f"git archive of {args.snapshot}", "commit": commit, "path": str(args.code)}
    variants = [v for v in VARIANTS if not args.variants or v.slug in args.variants or v.slug == "stock"]
    variants += [EXTRAS[name] for name in args.extras] + args.agoq
    machine = machine_info()
    if shutil.which("g++") is None:
        print("warning: no C++ compiler: DeepSpeed's CPU comm op cannot be JIT-built", file=sys.stderr)
    runs_by_seed: list[dict[str, dict]] = [{} for _ in range(args.seeds)]
    jobs = [(k, v) for k in range(args.seeds) for v in variants]
    progress = tqdm(jobs, desc="convergence", unit="run")
    for k, variant in progress:
        if args.seeds > 1:  # the same variant from seed + k, paired with stock from seed + k
            variant = dataclasses.replace(variant, slug=f"{variant.slug}.s{k}", seed_offset=variant.seed_offset + k)
        progress.set_postfix_str(f"{variant.name} seed +{k} (log: {args.out / 'logs' / variant.slug}.log)")
        last = run_variant(variant, args)
        runs_by_seed[k][variant.slug.split(".s")[0]] = last
        tqdm.write(
            f"{variant.name:20s} seed +{k} held-out {last['heldout'][-1][1]:.4f}  train(last) {last['loss'][-1]:.4f}  "
            f"{last['wall_s']:.0f}s  load {last['load_average_after']}"
        )
    runs = runs_by_seed[0]
    tail = min(20, args.steps)
    summary = summarize(runs, tail)
    paired = paired_gaps(runs_by_seed) if args.seeds > 1 else None
    agoq = summary.get("agoq")
    target = None
    if agoq is not None and paired is None:
        target = {
            "metric": "final held-out loss, agoq relative to stock",
            "limit": TARGET_REL,
            "value": agoq["heldout_final_vs_stock"],
            "met": agoq["heldout_final_vs_stock"] <= TARGET_REL,
        }
    elif agoq is not None:
        gap = paired["agoq"]
        target = {
            "metric": f"mean paired gap of the final held-out loss over {args.seeds} seeds, agoq vs stock",
            "limit": TARGET_REL,
            "ci95_upper_limit": TARGET_CI_UPPER,
            "value": gap["mean"],
            "ci95": gap["ci95"],
            "met": gap["mean"] <= TARGET_REL and gap["ci95"][1] <= TARGET_CI_UPPER,
        }
    machine_end = machine_info()
    result = {
        "command": command,
        "machine": machine,
        "code": code,
        "load_average_end": machine_end["load_average"],
        "finished": machine_end["date"],
        "setup": {
            "model": args.model,
            "parameters": runs["stock"]["parameters"],
            "world_size": args.world_size,
            "device": args.device,
            "zero_stage": 2,
            "bf16": args.dtype == "bf16",
            "offload": args.offload,
            "steps": args.steps,
            "seq_len": args.seq_len,
            "micro_batch": args.micro_batch,
            "grad_accum": args.grad_accum,
            "tokens_per_step": args.steps and args.seq_len * args.micro_batch * args.grad_accum * args.world_size,
            "lr": args.lr,
            "seed": args.seed,
            "seeds": args.seeds,
            "eval_every": args.eval_every,
            "heldout_tokens": args.eval_batches * args.micro_batch * args.world_size * args.seq_len,
            "threads_per_rank": args.threads,
        },
        "target": target,
        "summary": summary,
        "paired": paired,
        "curves": {
            (slug if args.seeds == 1 else f"{slug}.s{k}"): {
                "name": r["name"],
                "seed": r["seed"],
                "agoq": r["agoq_block"],
                "loss": r["loss"],
                "heldout": r["heldout"],
            }
            for k, seed_runs in enumerate(runs_by_seed)
            for slug, r in seed_runs.items()
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out_json = args.out / "convergence.json"
    out_json.write_text(json.dumps(result, indent=1))
    png = args.plot or args.out / "convergence.png"
    s = result["setup"]
    title = (
        f"LLaMA {args.model} ({s['parameters'] / 1e6:.1f}M params), {args.world_size} {args.device.upper()} ranks, "
        f"ZeRO-2 {args.dtype}{', optimizer offload' if args.offload != 'none' else ''}, "
        f"{args.steps} steps x {s['tokens_per_step']} tokens, seq {args.seq_len}; {describe(machine)}"
    )
    plot(runs, summary, png, title, paired)
    print_table(summary, tail)
    if paired is not None:
        for gap in paired.values():
            lo, hi = gap["ci95"]
            gaps = ", ".join(f"{g:+.2%}" for g in gap["gaps"])
            interval = f"95% interval {lo:+.2%} .. {hi:+.2%}"
            print(f"{gap['name']:20s} paired gap {gap['mean']:+.2%} ({interval}; seeds: {gaps})")
    if target is not None:
        verdict = "met" if target["met"] else "MISSED"
        bound = f", interval upper end <= {TARGET_CI_UPPER:.1%}" if paired is not None else ""
        what = f"agoq final held-out within {TARGET_REL:.0%} of stock{bound}"
        print(f"target ({what}): {target['value']:+.2%} -> {verdict}")
    print(f"wrote {out_json} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
