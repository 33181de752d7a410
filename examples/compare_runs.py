"""Compare a baseline run and an agoq run written by ``pretrain_llama.py --out``: table + loss plot.

    python examples/compare_runs.py runs/demo/baseline.json runs/demo/agoq.json --plot runs/demo/loss.png

Every figure is the agoq run's value over the baseline run's value, both measured on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table


def _last_heldout(run: dict) -> float:
    return run["heldout"][-1][1] if run["heldout"] else float("nan")


def _tail_loss(run: dict, window: int = 10) -> float:
    losses = run["loss"]
    return statistics.fmean(losses[-window:])


def _median(values: list[float], skip: int = 1) -> float:
    values = values[skip:] or values
    return statistics.median(values)


ROWS = (
    ("train loss (mean of last 10 steps)", _tail_loss, "{:.4f}"),
    ("held-out loss (final)", _last_heldout, "{:.4f}"),
    ("stored activation bytes / micro-batch", lambda r: _median(r["activation_bytes_per_micro_batch"]), "{:,.0f}"),
    ("gradient-buffer bytes", lambda r: _median(r["gradient_buffer_bytes"]), "{:,.0f}"),
    ("communicated bytes / step (per rank)", lambda r: _median(r["comm_bytes_per_step"]), "{:,.0f}"),
    ("step time, median (s)", lambda r: _median(r["step_time_s"]), "{:.3f}"),
)


def compare(baseline: dict, agoq: dict) -> list[dict]:
    """Rows of ``{"metric", "baseline", "agoq", "ratio"}`` (ratio = agoq / baseline)."""
    rows = []
    for name, get, _ in ROWS:
        b, a = get(baseline), get(agoq)
        rows.append({"metric": name, "baseline": b, "agoq": a, "ratio": a / b if b else float("nan")})
    return rows


def plot(baseline: dict, agoq: dict, path: Path) -> None:
    """Loss curves (train per step, held-out points) of both runs in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run, color in ((baseline, "tab:blue"), (agoq, "tab:orange")):
        ax.plot(range(1, len(run["loss"]) + 1), run["loss"], color=color, alpha=0.6, label=f"{run['label']} train")
        if run["heldout"]:
            steps, losses = zip(*run["heldout"], strict=True)
            ax.plot(steps, losses, "o-", color=color, label=f"{run['label']} held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title(f"{baseline['model']} LLaMA, {baseline['world_size']} ranks: stock DeepSpeed vs agoq")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline", type=Path)
    parser.add_argument("agoq", type=Path)
    parser.add_argument("--plot", type=Path, help="write the loss-curve PNG here")
    parser.add_argument("--json", type=Path, help="write the comparison rows as JSON here")
    args = parser.parse_args()
    baseline, agoq = (json.loads(p.read_text()) for p in (args.baseline, args.agoq))
    rows = compare(baseline, agoq)

    compute = agoq.get("compute_dtype", "as configured")
    table = Table(
        title=f"agoq vs stock DeepSpeed ({len(agoq['loss'])} steps, {agoq['world_size']} ranks, {compute} compute)"
    )
    for col in ("metric", "baseline", "agoq", "agoq / baseline"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for row, (_, _, fmt) in zip(rows, ROWS, strict=True):
        table.add_row(row["metric"], fmt.format(row["baseline"]), fmt.format(row["agoq"]), f"{row['ratio']:.3f}")
    Console(width=120).print(table)
    if args.plot:
        plot(baseline, agoq, args.plot)
        print(f"loss curves: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
