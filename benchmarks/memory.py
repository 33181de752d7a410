"""Memory: exact bytes of what training keeps and sends, stock DeepSpeed versus agoq, beside the planner.

For each model shape, two ranks (gloo) train a few ZeRO-2 bf16 steps on real text, once with stock
DeepSpeed and once with ``"agoq": {}`` (defaults), each in fresh processes. The last step's figures,
per rank, counted tensor by tensor:

* stored activations per micro-batch: stock = bytes autograd saves (``SavedActivationMeter``,
  parameters excluded, each storage once); agoq = codes + scales + tensors kept as they are
  (``activation/stored_bytes_per_forward``, agoq's ledger);
* gradient buffers: stock = DeepSpeed's owned fp32 accumulation partition; agoq = int8 codes +
  scales (+ error-feedback residuals when enabled), ``gradient/state_bytes``;
* optimizer states: fp32 master partition + Adam moments (the same in both);
* weights: the bf16 module parameters (the same in both);
* communicated gradient bytes per optimizer step: what this rank puts on the wire in gradient
  collectives (``CollectiveMeter``: all-reduce/reduce/reduce-scatter/all-to-all/point-to-point; the ZeRO-2
  parameter all-gather after the step is listed separately);
* peak RSS of the rank process (secondary: it includes Python, torch and DeepSpeed themselves).

Beside each figure: the planner's prediction (``agoq_ds.planner.plan`` for the same dimensions,
sequence, micro-batch and data-parallel size) or, for communication, the ring/pairwise byte formula.

    python benchmarks/memory.py                                   # 10m and a hidden-2048 shape
    python benchmarks/memory.py --models tiny --steps 2 --out /tmp/m.json   # smoke run

Writes ``--out`` (JSON, default results/memory.json) and a chart (``--plot``, default next to it).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if not __package__:  # run as a script (python benchmarks/x.py): the repository root holds the benchmarks package
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks._machine import ROOT, SNAPSHOT_ENV, describe, machine_info, reexec_in_snapshot

GRADIENT_OPS = ("all_reduce", "reduce", "reduce_scatter_tensor", "all_to_all_single", "batch_isend_irecv")
"""``deepspeed.comm`` ops that carry gradients in ZeRO-2 (stock and agoq; agoq's exchange is a batch of
point-to-point sends on gloo, ``all_to_all_single`` elsewhere)."""


@dataclass(frozen=True)
class Setup:
    """One model shape and its batch."""

    name: str
    """Display name."""
    shape: str | dict
    """``agoq_ds.testing.models.SHAPES`` key, or ``LlamaShape`` fields."""
    seq_len: int
    """Tokens per sequence."""
    micro_batch: int
    """Sequences per micro-batch per rank."""
    grad_accum: int = 2
    """Micro-batches per optimizer step."""


SETUPS: dict[str, Setup] = {
    "10m": Setup("10m (convergence model)", "10m", seq_len=128, micro_batch=2),
    "h2048": Setup(
        "hidden 2048 x 2 layers",
        {"hidden": 2048, "layers": 2, "heads": 16, "kv_heads": 8, "intermediate": 5632},
        seq_len=512,
        micro_batch=1,
    ),
    "tiny": Setup("tiny (smoke)", "tiny", seq_len=64, micro_batch=2),
}
"""Shapes this benchmark knows; ``--models`` picks some (default: 10m and h2048)."""

VARIANTS: dict[str, dict | None] = {"stock": None, "agoq": {}}
"""Compared variants: their ``"agoq"`` block (``None``: no block)."""


def llama_shape(setup: Setup):
    """The ``LlamaShape`` of ``setup``."""
    from agoq_ds.testing.models import SHAPES, LlamaShape

    return SHAPES[setup.shape] if isinstance(setup.shape, str) else LlamaShape(**setup.shape)


def ds_config(setup: Setup, agoq: dict | None) -> dict:
    """``ds_configs/zero2_baseline.json`` (ZeRO-2, bf16, AdamW) with this setup's batch, no schedule."""
    cfg = json.loads((ROOT / "ds_configs" / "zero2_baseline.json").read_text())
    cfg.pop("scheduler", None)
    cfg["train_micro_batch_size_per_gpu"] = setup.micro_batch
    cfg["gradient_accumulation_steps"] = setup.grad_accum
    cfg["steps_per_print"] = 10**6
    if agoq is not None:
        cfg["agoq"] = agoq
    return cfg


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def optimizer_state_bytes(optimizer) -> int:
    """fp32 master partitions + every tensor in the wrapped torch optimizer's state (Adam moments)."""
    import torch

    tensors = list(getattr(optimizer, "single_partition_of_fp32_groups", []))
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor) and v.numel() > 1]
    return _storage_bytes(tensors)


def accumulation_dtype(optimizer) -> str:
    """dtype of stock DeepSpeed's gradient accumulation partition (read before ``step()`` frees it)."""
    groups = getattr(optimizer, "averaged_gradients", {}).values()
    tensors = [t for g in groups if g is not None for t in g if t is not None]
    return str(tensors[0].dtype) if tensors else "n/a"


def measure(rank: int, world: int, setup: Setup, agoq: dict | None, steps: int, seed: int) -> dict:
    """Rank function: train ``steps`` steps, return the last step's exact byte counts on this rank."""
    from contextlib import nullcontext

    import deepspeed

    from agoq_ds.testing.data import batches, load_bytes, split
    from agoq_ds.testing.models import build_llama
    from agoq_ds.testing.stats import CollectiveMeter, SavedActivationMeter, gradient_buffer_bytes

    model = build_llama(llama_shape(setup), seed=seed)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(setup, agoq))
    is_agoq = hasattr(engine, "agoq_stats")
    train, _ = split(load_bytes())
    data = batches(train, setup.micro_batch, setup.seq_len, seed=seed, rank=rank, world_size=world)
    saved_bytes: list[int] = []
    grad_buffer, grad_dtype = 0, "n/a"
    with CollectiveMeter() as meter:
        for _ in range(steps):
            meter.reset()
            saved_bytes.clear()
            for micro in range(setup.grad_accum):
                batch = next(data)
                with SavedActivationMeter(engine.module) if not is_agoq else nullcontext() as saved:
                    loss = engine(input_ids=batch, labels=batch).loss
                if saved is not None:
                    saved_bytes.append(saved.bytes)
                engine.backward(loss)
                if micro == setup.grad_accum - 1:
                    grad_buffer = gradient_buffer_bytes(engine.optimizer)
                    grad_dtype = accumulation_dtype(engine.optimizer)
                engine.step()
    stats = engine.agoq_stats() if is_agoq else {}
    sent = dict(meter.sent)
    result = {
        "rank": rank,
        "engine": type(engine).__name__,
        "parameters": sum(p.numel() for p in engine.module.parameters()),
        "weights": _storage_bytes(engine.module.parameters()),
        "optimizer": optimizer_state_bytes(engine.optimizer),
        "gradients": stats.get("gradient/state_bytes", grad_buffer) if is_agoq else grad_buffer,
        "gradient_dtype": "int8 + fp32 scales" if is_agoq else grad_dtype,
        "activations": stats["activation/stored_bytes_per_forward"] if is_agoq else max(saved_bytes),
        "comm_gradient": sum(v for k, v in sent.items() if k in GRADIENT_OPS),
        "comm_param_allgather": sent.get("all_gather_into_tensor", 0),
        "comm_by_op": sent,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "loss": loss.float().item(),
    }
    if is_agoq:
        result["agoq"] = {
            k: v
            for k, v in stats.items()
            if not k.startswith("activation/class/") and not k.startswith("activation/module/")
        }
    return result


def predict(setup: Setup, world: int) -> dict:
    """The planner's per-GPU figures for ``setup`` (stock and agoq defaults), plus the comm formula."""
    from agoq_ds.config import parse_agoq_config
    from agoq_ds.planner import ModelDims, Parallelism, plan

    s = llama_shape(setup)
    dims = ModelDims(setup.name, s.vocab, s.hidden, s.layers, s.heads, s.kv_heads, s.intermediate)
    par = Parallelism(setup.seq_len, setup.micro_batch, setup.grad_accum, dp=world, zero=2)
    (stage,) = plan(dims, par, parse_agoq_config({}))
    n, groups = dims.params(), -(-dims.params() // 128)
    # Gradient traffic per optimizer step (ZeRO-2 reduces every micro-batch): a ring all-reduce of the
    # bf16 gradients sends 2(N-1)/N bytes of each; agoq's int8 reduce-scatter (N-1)/N codes + fp32 scales.
    ring_bf16 = setup.grad_accum * 2 * (world - 1) * 2 * n // world
    int8_rs = setup.grad_accum * (world - 1) * (n + 4 * groups) // world
    return {
        "parameters": n,
        "stock": {
            "weights": stage.weights,
            "optimizer": stage.optimizer,
            "gradients": stage.gradients["baseline"],
            "activations": stage.activations["baseline"],
            "comm_gradient": ring_bf16,
        },
        "agoq": {
            "weights": stage.weights,
            "optimizer": stage.optimizer,
            "gradients": stage.gradients["agoq"],
            "activations": stage.activations["agoq"],
            "comm_gradient": int8_rs,
        },
    }


ROWS = (
    ("activations", "stored activations / micro-batch"),
    ("gradients", "gradient buffers"),
    ("optimizer", "optimizer states (fp32 master + Adam)"),
    ("weights", "bf16 weights"),
    ("comm_gradient", "gradient bytes sent / step"),
)
"""Figures with a prediction, in table order: (key, label)."""


def run_setup(setup: Setup, world: int, steps: int, seed: int) -> dict:
    """Both variants of one setup (each in fresh processes), with the planner's predictions."""
    from agoq_ds.testing.distributed import run_ranks

    measured = {}
    for variant, block in VARIANTS.items():
        per_rank = run_ranks(measure, world, (setup, block, steps, seed), timeout=3600)
        measured[variant] = {"rank0": per_rank[0], "per_rank": per_rank}
    result = {"setup": asdict(setup), "predicted": predict(setup, world), "measured": measured}
    result["notes"] = deviations(result)
    return result


def deviations(res: dict, limit: float = 0.05) -> list[str]:
    """Notes on every measured figure more than ``limit`` away from its prediction, with the reason
    where it is known."""
    notes = []
    for variant in VARIANTS:
        m, p = res["measured"][variant]["rank0"], res["predicted"][variant]
        for key, label in ROWS:
            if not p[key] or abs(m[key] / p[key] - 1) <= limit:
                continue
            note = f"{variant} {label}: measured {m[key] / p[key]:.3f}x the prediction"
            if key == "gradients" and variant == "stock" and m.get("gradient_dtype") != "torch.float32":
                note += (
                    f" (the planner assumes an fp32 accumulation buffer, as Megatron-LM keeps and DeepSpeed with "
                    f"data_types.grad_accum_dtype=fp32; stock DeepSpeed's bf16 ZeRO-2 accumulates in "
                    f"{m.get('gradient_dtype')})"
                )
            notes.append(note)
    return notes


def table(result: dict) -> str:
    """Measured (rank 0) beside predicted, stock and agoq, with agoq/stock ratios."""
    mib = 2**20
    out = []
    for res in result["setups"].values():
        m, p = res["measured"], res["predicted"]
        s = res["setup"]
        out.append(
            f"\n{s['name']} ({p['parameters'] / 1e6:.1f}M params), seq {s['seq_len']}, micro-batch {s['micro_batch']}"
            f" x {s['grad_accum']}, rank 0 — MiB measured [predicted]:"
        )
        out.append(f"  {'':40s} {'stock':>20s} {'agoq':>20s} {'agoq/stock':>10s}")
        for row, label in ROWS:
            cells = []
            for v in VARIANTS:
                got, want = m[v]["rank0"][row], p[v][row]
                cells.append(f"{got / mib:9.2f} [{want / mib:8.2f}]")
            ratio = m["agoq"]["rank0"][row] / m["stock"]["rank0"][row] if m["stock"]["rank0"][row] else float("nan")
            out.append(f"  {label:40s} {cells[0]:>20s} {cells[1]:>20s} {ratio:10.3f}")
        rss = [m[v]["rank0"]["peak_rss"] / mib for v in VARIANTS]
        out.append(
            f"  {'peak RSS (secondary, whole process)':40s} {rss[0]:20.1f} {rss[1]:20.1f} {rss[1] / rss[0]:10.3f}"
        )
        allg = [m[v]["rank0"]["comm_param_allgather"] / mib for v in VARIANTS]
        out.append(f"  {'parameter all-gather sent / step':40s} {allg[0]:20.2f} {allg[1]:20.2f}")
        out += [f"  note: {n}" for n in res["notes"]]
    return "\n".join(out)


def plot(result: dict, path: Path) -> None:
    """Per setup: stock and agoq bars (measured) per figure, with the planner's prediction as a marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = result["setups"]
    fig, axes = plt.subplots(1, len(setups), figsize=(7 * len(setups), 4.8), squeeze=False)
    for ax, res in zip(axes[0], setups.values(), strict=True):
        m, p = res["measured"], res["predicted"]
        x = range(len(ROWS))
        for j, (variant, color) in enumerate((("stock", "tab:gray"), ("agoq", "tab:blue"))):
            xs = [i + 0.4 * j - 0.2 for i in x]
            vals = [m[variant]["rank0"][k] / 2**20 for k, _ in ROWS]
            ax.bar(xs, vals, 0.38, color=color, label=f"{variant} (measured)")
            ax.scatter(xs, [p[variant][k] / 2**20 for k, _ in ROWS], marker="_", s=300, color="red", zorder=3)
            for xi, v in zip(xs, vals, strict=True):
                ax.text(xi, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
        ax.scatter([], [], marker="_", s=300, color="red", label="planner / formula")
        ax.set_xticks(list(x), [label.replace(" (fp32 master + Adam)", "") for _, label in ROWS], rotation=20)
        ax.set_ylabel("MiB per rank")
        ax.set_title(f"{res['setup']['name']}, seq {res['setup']['seq_len']}, ZeRO-2 bf16, 2 ranks")
        ax.legend(fontsize=8)
    fig.suptitle(f"exact bytes, stock DeepSpeed vs agoq\n{describe(result['machine'])}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Measure every chosen setup, print the table, write JSON and PNG."""
    import os

    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(SETUPS), default=["10m", "h2048"])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (the last one is reported)")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "memory.json")
    parser.add_argument("--plot", type=Path, help="PNG path (default: --out with .png)")
    parser.add_argument(
        "--snapshot",
        nargs="?",
        const="HEAD",
        metavar="REV",
        help="run a commit's code (default HEAD) from a snapshot, not the (changing) checkout",
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.snapshot and SNAPSHOT_ENV not in os.environ:
        reexec_in_snapshot(__file__, argv, args.snapshot)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    commit = os.environ.get(SNAPSHOT_ENV)
    result: dict = {
        "command": "python benchmarks/memory.py " + " ".join(argv),
        "code": {"source": "git archive of HEAD", "commit": commit} if commit else {"source": "checkout"},
        "machine": machine_info(),
        "world_size": args.world_size,
        "steps": args.steps,
        "setups": {},
    }
    for key in tqdm(args.models, desc="memory", unit="model"):
        result["setups"][key] = run_setup(SETUPS[key], args.world_size, args.steps, args.seed)
    result["load_average_end"] = machine_info()["load_average"]
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    png = args.plot or args.out.with_suffix(".png")
    plot(result, png)
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
