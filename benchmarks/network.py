"""Communication-bound speed: stock DeepSpeed ZeRO-2 versus agoq, two hosts on a shaped link.

Two ranks run as two hosts: each in its own network namespace, joined by a veth pair that ``tc``
shapes to each ``--rates`` value (``benchmarks/_netns.py``). Each rank is
``ip netns exec <ns> python examples/pretrain_llama.py ...`` with the torchrun-style environment
(``RANK``, ``WORLD_SIZE=2``, ``LOCAL_RANK=0``, ``LOCAL_SIZE=1``, ``MASTER_ADDR`` = rank 0's veth
address) and ``GLOO_SOCKET_IFNAME`` = its veth end, so gloo can only talk over the link.
DeepSpeed's shared-memory all-reduce cannot bypass it: that op serves only
``inference_all_reduce`` and initialises only when ``LOCAL_SIZE == WORLD_SIZE`` (here 1 != 2);
training collectives go through ``torch.distributed`` (gloo). The veth byte counters, read after
every step, show what really crossed the link; they are reported beside ``CollectiveMeter``'s figure.

At every rate, stock DeepSpeed (``ds_configs/zero2_baseline.json``) and agoq
(``ds_configs/zero2_agoq.json``; ``--zero-stage 3``: the ``zero3_*`` pair) train the same model on
the same batches (same seed, micro-batch,
gradient accumulation and sequence length; only the ``"agoq"`` block differs), alternating run by
run, and the median step time after ``--warmup`` steps gives the agoq/stock ratio.

    python benchmarks/network.py                    # 1 and 10 Gbit/s, JSON + PNG in results/
    python benchmarks/network.py --quick --out /tmp/net.json   # smoke run (tiny model, 1 Gbit/s)

Needs root (``ip netns``); creates and removes its namespaces itself (names ``agoqnet<pid>a|b``,
addresses 10.213.x.1/2 inside them only) and bounds every subprocess with a timeout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if not __package__:  # run as a script (python benchmarks/x.py): the repository root holds the benchmarks package
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from benchmarks._machine import machine_info, write_results
from benchmarks._netns import Link, NetnsError, VethPair, cleanup_stale, loadavg, netns_available

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "pretrain_llama.py"
VARIANTS: dict[str, tuple[str, dict | None]] = {
    "stock": ("ds_configs/zero2_baseline.json", None),
    "agoq": ("ds_configs/zero2_agoq.json", None),
    "agoq-grad": ("ds_configs/zero2_agoq.json", {"activation": {"enabled": False}}),
}
"""Run variants: base config and an optional replacement of its ``"agoq"`` block (``agoq-grad``:
8-bit gradients only, activations unquantized)."""

TARGET_RATIO = 0.75
"""At 1 Gbit/s agoq's step time must be at most this fraction of stock's (the paper's 1.34x)."""

FAIRNESS = (
    "Both runs train the same LLaMA model from the same seed on the same batches (micro-batch, "
    "gradient accumulation, sequence length, bf16, ZeRO-2 with reduce_scatter and the same bucket "
    "sizes); the configs differ only by the 'agoq' block, and agoq pays for all its extra compute "
    "(activation and gradient quantization) inside the measured step. ZeRO-2 reduces gradients at "
    "every micro-step, so gradient accumulation multiplies the reduction traffic that agoq shrinks "
    "(bf16 ring all-reduce 2(N-1)/N*2 B/param vs int8 all-to-all (N-1)/N*1 B/param + scales), while "
    "the parameter all-gather after each optimizer step (bf16, identical in both) is paid once per "
    "step. The short sequence keeps this 2-core CPU's compute per micro-step small next to the "
    "gradient exchange, which is the regime of data-parallel LLM training on GPUs whose compute is "
    "~1000x this CPU's over links ~100x faster: the setting the paper's speed-up is about."
)


@dataclass
class RunResult:
    """One training run of one variant on one link."""

    variant: str
    link: str
    rate_mbit: float | None
    repeat: int
    ok: bool
    warmup: int = 0
    """Leading steps left out of the median."""
    error: str | None = None
    wall_s: float = 0.0
    step_time_s: list[float] = field(default_factory=list)
    median_step_s: float | None = None
    meter_bytes_per_step: float | None = None
    """Rank 0's bytes on the wire per step as ``CollectiveMeter`` models them (deepspeed.comm ops)."""
    link_tx_bytes_per_step: float | None = None
    """Bytes rank 0's veth end transmitted per training step, averaged over all steps (Ethernet
    frames: payload + TCP/IP/Ethernet headers)."""
    link_rx_bytes_per_step: float | None = None
    """Bytes rank 0's veth end received per training step (= what rank 1 sent)."""
    link_tx_bytes_total: int | None = None
    """Bytes rank 0 transmitted during the whole run, setup (parameter broadcast) included."""
    link_rx_bytes_total: int | None = None
    final_loss: float | None = None
    engine: str | None = None
    loadavg_before: list[float] = field(default_factory=list)
    loadavg_after: list[float] = field(default_factory=list)
    log_dir: str | None = None


# --- one training run on the link ------------------------------------------------------------------


class ProgressMonitor(threading.Thread):
    """Reads rank 0's stderr into a log, follows the example's tqdm bar (``| k/N [``), and reads the
    veth counters when the bar first appears, i.e. after setup and before the first training step.

    Bytes per step are then ``(counter at the end - counter at the bar) / steps``. This does not
    depend on this thread's scheduling delay as long as it is shorter than the first forward pass
    (nothing is sent between the bar's creation and the first gradient reduction), and after the
    last step only a one-batch held-out loss (no parameters or gradients) is exchanged.
    """

    STEP = re.compile(rb"\|\s*(\d+)/(\d+) \[")

    def __init__(self, stream, log_path: Path, pair: VethPair, bar: tqdm | None) -> None:
        super().__init__(daemon=True)
        self.stream, self.log_path, self.pair, self.bar = stream, log_path, pair, bar
        self.at_start: dict[str, int] | None = None
        """Rank 0's veth counters when the progress bar appeared."""
        self.last_step = 0

    def run(self) -> None:
        pending = b""
        with open(self.log_path, "wb") as log:
            while chunk := os.read(self.stream.fileno(), 65536):
                log.write(chunk)
                pending += chunk
                *segments, pending = re.split(rb"[\r\n]", pending)
                # tqdm starts each refresh with "\r" and ends it with nothing: the unterminated tail
                # is the bar as it stands now, so it is read too (re-reading it later is harmless).
                for seg in [*segments, pending]:
                    if m := self.STEP.search(seg):
                        self._seen(int(m.group(1)))

    def _seen(self, step: int) -> None:
        if self.at_start is None:
            self.at_start = self.pair.counters(0)
        if step > self.last_step and self.bar is not None:
            self.bar.update(step - self.last_step)
        self.last_step = max(self.last_step, step)


def write_config(variant: str, args: argparse.Namespace, directory: Path) -> Path:
    """The variant's ds_config with this benchmark's batch settings (everything else as shipped)."""
    base, agoq_block = VARIANTS[variant]
    base = base.replace("zero2_", f"zero{args.zero_stage}_")
    cfg = json.loads((ROOT / base).read_text())
    cfg["train_micro_batch_size_per_gpu"] = args.micro_batch
    cfg["gradient_accumulation_steps"] = args.grad_accum
    cfg["steps_per_print"] = 10**6
    if agoq_block is not None:
        cfg["agoq"] = agoq_block
    path = directory / f"{variant}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def rank_env(pair: VethPair, rank: int, args: argparse.Namespace) -> dict[str, str]:
    """The torchrun-style environment of one rank, bound to its veth end."""
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK="0",
        LOCAL_SIZE="1",  # one rank per "host": DeepSpeed's shm all-reduce stays off
        MASTER_ADDR=pair.addr[0],
        MASTER_PORT=str(args.port),
        GLOO_SOCKET_IFNAME=pair.dev[rank],
        OMP_NUM_THREADS=str(args.threads),
        PYTHONUNBUFFERED="1",
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    return env


def command_line(pair: VethPair, rank: int, args: argparse.Namespace, argv: list[str]) -> str:
    """The shell command equivalent to how one rank is started (for the logs and the docs)."""
    env = rank_env(pair, rank, args)
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME")
    keys += ("OMP_NUM_THREADS",)
    return " ".join(pair.exec_argv(rank, ["env", *(f"{k}={env[k]}" for k in keys), *argv]))


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process group this benchmark started for one rank."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def wait_bounded(procs: list[subprocess.Popen], timeout: float) -> str | None:
    """Wait for all ranks; returns an error when ``timeout`` passes first (a rank that failed makes
    its peer wait for gloo's own timeout, so the peer gets 15 s and is then killed by the caller)."""
    deadline = time.monotonic() + timeout
    failed_at = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if now > deadline:
            return f"timed out after {timeout:.0f} s"
        if any(p.poll() not in (None, 0) for p in procs):
            failed_at = failed_at or now
            if now - failed_at > 15:
                return None
        time.sleep(0.2)
    return None


def train_on_link(
    pair: VethPair, variant: str, config: Path, args: argparse.Namespace, log_dir: Path, repeat: int, bar: tqdm | None
) -> RunResult:
    """Run ``examples/pretrain_llama.py`` as two ranks across the link; returns what was measured."""
    link = pair.link
    res = RunResult(variant, link.label, link.rate_mbit, repeat, ok=False, warmup=args.warmup, log_dir=str(log_dir))
    log_dir.mkdir(parents=True, exist_ok=True)
    out = log_dir / "run.json"
    argv = [sys.executable, str(SCRIPT), "--deepspeed_config", str(config), "--model", args.model]
    argv += ["--steps", str(args.steps), "--seq-len", str(args.seq_len), "--seed", str(args.seed)]
    argv += ["--eval-every", str(10**6), "--eval-batches", "1", "--label", variant]
    (log_dir / "command.txt").write_text(
        "\n".join(command_line(pair, r, args, argv + (["--out", str(out)] if r == 0 else [])) for r in (0, 1)) + "\n"
    )
    before = (pair.counters(0), loadavg(), time.monotonic())
    res.loadavg_before = before[1]
    procs: list[subprocess.Popen] = []
    monitor = None
    with open(log_dir / "rank0.out", "wb") as out0, open(log_dir / "rank1.log", "wb") as out1:
        try:
            rank0 = subprocess.Popen(
                pair.exec_argv(0, [*argv, "--out", str(out)]),
                env=rank_env(pair, 0, args),
                stdout=out0,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            procs.append(rank0)
            procs.append(
                subprocess.Popen(
                    pair.exec_argv(1, argv),
                    env=rank_env(pair, 1, args),
                    stdout=out1,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            monitor = ProgressMonitor(rank0.stderr, log_dir / "rank0.err", pair, bar)
            monitor.start()
            res.error = wait_bounded(procs, args.run_timeout)
        finally:
            for p in procs:
                _kill(p)
            if monitor is not None:
                monitor.join(timeout=10)
            if procs and procs[0].stderr is not None:
                procs[0].stderr.close()
    res.wall_s = time.monotonic() - before[2]
    res.loadavg_after = loadavg()
    after = pair.counters(0)
    res.link_tx_bytes_total = after["tx_bytes"] - before[0]["tx_bytes"]
    res.link_rx_bytes_total = after["rx_bytes"] - before[0]["rx_bytes"]
    codes = [p.returncode for p in procs]
    if res.error is None and (len(procs) < 2 or any(c != 0 for c in codes) or not out.exists()):
        res.error = f"rank exit codes {codes}; see {log_dir}/rank0.err and rank1.log"
    if res.error is not None:
        return res
    record = json.loads(out.read_text())
    res.ok = True
    res.engine = record.get("engine")
    res.step_time_s = record["step_time_s"]
    res.median_step_s = statistics.median(res.step_time_s[args.warmup :])
    res.meter_bytes_per_step = statistics.mean(record["comm_bytes_per_step"])
    res.final_loss = record["loss"][-1] if record["loss"] else None
    assert monitor is not None
    if monitor.at_start is not None:
        res.link_tx_bytes_per_step = (after["tx_bytes"] - monitor.at_start["tx_bytes"]) / len(res.step_time_s)
        res.link_rx_bytes_per_step = (after["rx_bytes"] - monitor.at_start["rx_bytes"]) / len(res.step_time_s)
    return res


# --- the benchmark ---------------------------------------------------------------------------------


def summarize(runs: list[RunResult], variants: list[str], probes: dict[str, float]) -> list[dict]:
    """Per link: pooled median step time of each variant, its ratio to stock, and the share of the
    step the link needs for the bytes measured on it (``link_s`` at the probed TCP goodput)."""
    rows = []
    for link in dict.fromkeys(r.link for r in runs):
        row: dict = {"link": link, "rate_mbit": next(r.rate_mbit for r in runs if r.link == link)}
        for v in variants:
            done = [r for r in runs if r.link == link and r.variant == v and r.ok]
            steady = [t for r in done for t in r.step_time_s[r.warmup :]]
            row[v] = {
                "median_step_s": statistics.median(steady) if steady else None,
                "runs": len(done),
                "steady_steps": len(steady),
                "meter_bytes_per_step": _mean([r.meter_bytes_per_step for r in done]),
                "link_tx_bytes_per_step": _mean([r.link_tx_bytes_per_step for r in done]),
                "link_rx_bytes_per_step": _mean([r.link_rx_bytes_per_step for r in done]),
            }
        stock = row.get("stock", {}).get("median_step_s")
        goodput = probes.get(link, 0.0) * 1e6 / 8
        for v in variants:
            s = row[v]
            med = s["median_step_s"]
            s["ratio_vs_stock"] = med / stock if (med and stock) else None
            wire = max(s["link_tx_bytes_per_step"] or 0, s["link_rx_bytes_per_step"] or 0)
            s["link_s"] = wire / goodput if goodput else None
            s["link_share"] = s["link_s"] / med if (s["link_s"] and med) else None
        rows.append(row)
    return rows


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def verdict(summary: list[dict]) -> dict:
    """The issue's target: at 1 Gbit/s, agoq's median step time <= 0.75x stock's."""
    row = next((r for r in summary if r["rate_mbit"] == 1000), None)
    ratio = row["agoq"]["ratio_vs_stock"] if row and "agoq" in row else None
    return {
        "target": f"agoq/stock median step time <= {TARGET_RATIO} at 1 Gbit/s",
        "ratio_at_1gbit": ratio,
        "met": None if ratio is None else ratio <= TARGET_RATIO,
    }


def run(args: argparse.Namespace) -> dict:
    """Create the namespaces, run every (rate, repeat, variant), remove the namespaces; returns the JSON result."""
    ok, why = netns_available()
    if not ok:
        raise NetnsError(why)
    stale = cleanup_stale()
    log_root = Path(args.log_dir or tempfile.mkdtemp(prefix="agoq-network-"))
    log_root.mkdir(parents=True, exist_ok=True)
    configs = {v: write_config(v, args, log_root) for v in args.variants}
    links = [Link(rate_mbit=r or None, delay_ms=args.delay_ms) for r in args.rates]
    runs: list[RunResult] = []
    probes: dict[str, float] = {}
    qdiscs: dict[str, str] = {}
    machine, started = machine_info(), loadavg()
    total = len(links) * args.repeats * len(args.variants) * args.steps
    with VethPair() as pair, tqdm(total=total, desc="network", unit="step", file=sys.stderr) as bar:
        for link in links:
            pair.shape(link)
            qdiscs[link.label] = pair.qdiscs(0)
            rate_bytes = (link.rate_mbit or 20000) * 1e6 / 8
            probes[link.label] = pair.probe_mbit(int(min(256e6, max(16e6, rate_bytes * 0.5))))
            for rep in range(args.repeats):
                order = args.variants if rep % 2 == 0 else args.variants[::-1]  # ABBA against drift
                for v in order:
                    bar.set_postfix_str(f"{link.label} {v} #{rep + 1}")
                    tag = f"{link.label.replace(' ', '').replace('/', '')}-{v}-{rep}"
                    res = train_on_link(pair, v, configs[v], args, log_root / tag, rep, bar)
                    if not res.ok:
                        tqdm.write(f"[network] {link.label} {v}: FAILED: {res.error}", file=sys.stderr)
                    runs.append(res)
    summary = summarize(runs, args.variants, probes)
    return {
        "machine": machine,
        "meta": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "loadavg_start": started,
            "loadavg_end": loadavg(),
            "model": args.model,
            "seq_len": args.seq_len,
            "micro_batch": args.micro_batch,
            "grad_accum": args.grad_accum,
            "steps": args.steps,
            "warmup": args.warmup,
            "threads_per_rank": args.threads,
            "repeats": args.repeats,
            "delay_ms": args.delay_ms,
            "zero_stage": args.zero_stage,
            "variants": {
                v: {
                    "config": VARIANTS[v][0].replace("zero2_", f"zero{args.zero_stage}_"),
                    "agoq_override": VARIANTS[v][1],
                }
                for v in args.variants
            },
            "link_probe_mbit": probes,
            "qdisc": qdiscs,
            "stale_namespaces_removed": stale,
            "log_dir": str(log_root),
            "fairness": FAIRNESS,
            "note": "2 shared CPU cores: re-measure on a quiet machine before quoting numbers",
        },
        "summary": summary,
        "verdict": verdict(summary),
        "runs": [asdict(r) for r in runs],
    }


def print_table(result: dict) -> None:
    """Print the per-link summary."""
    variants = list(result["meta"]["variants"])
    head = (
        f"{'link':20} {'variant':10} {'median s':>9} {'/stock':>7} {'meter MB/step':>14} {'link tx MB/step':>16}"
        f" {'link s':>7} {'share':>6}"
    )
    print(head)
    print("-" * len(head))
    for row in result["summary"]:
        for v in variants:
            s = row[v]

            def fmt(x: float | None, scale: float = 1.0, spec: str = ".3f") -> str:
                return "-" if x is None else format(x / scale, spec)

            print(
                f"{row['link']:20} {v:10} {fmt(s['median_step_s']):>9} {fmt(s['ratio_vs_stock'], spec='.2f'):>7} "
                f"{fmt(s['meter_bytes_per_step'], 1e6, '.2f'):>14} {fmt(s['link_tx_bytes_per_step'], 1e6, '.2f'):>16}"
                f" {fmt(s['link_s']):>7} {fmt(s['link_share'], spec='.0%'):>6}"
            )
    for link, mbit in result["meta"]["link_probe_mbit"].items():
        print(f"link probe {link}: {mbit:.0f} Mbit/s TCP goodput")
    v = result["verdict"]
    outcome = (
        "not measured (needs the agoq variant at 1 Gbit/s)" if v["met"] is None else ("met" if v["met"] else "NOT met")
    )
    print(f"target ({v['target']}): ratio {v['ratio_at_1gbit']} -> {outcome}")
    print(f"load average start {result['meta']['loadavg_start']} end {result['meta']['loadavg_end']}")


def plot(result: dict, path: Path) -> None:
    """Median step time per link and variant (ratio to stock on the bars) and bytes per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(result["meta"]["variants"])
    rows = result["summary"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        xs = [k + i * width for k in range(len(rows))]
        ys = [r[v]["median_step_s"] or 0 for r in rows]
        bars = ax1.bar(xs, ys, width, label=v)
        for b, r in zip(bars, rows, strict=True):
            ratio = r[v]["ratio_vs_stock"]
            if ratio is not None and v != "stock":
                ax1.annotate(f"{ratio:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom")
        meter = [(r[v]["meter_bytes_per_step"] or 0) / 1e6 for r in rows]
        link = [(r[v]["link_tx_bytes_per_step"] or 0) / 1e6 for r in rows]
        ax2.bar([x - width / 4 for x in xs], meter, width / 2, label=f"{v}: meter", alpha=0.6)
        ax2.bar([x + width / 4 for x in xs], link, width / 2, label=f"{v}: veth tx", hatch="//", alpha=0.9)
    for k, r in enumerate(rows):
        if r["rate_mbit"] == 1000 and r.get("stock", {}).get("median_step_s"):
            y = TARGET_RATIO * r["stock"]["median_step_s"]
            ax1.hlines(y, k - width / 2, k + 0.8 - width / 2, colors="k", linestyles="dashed", label="target")
    ticks = [k + 0.4 - width / 2 for k in range(len(rows))]
    ax1.set_xticks(ticks, [r["link"] for r in rows])
    ax1.set_ylabel("median step time (s)")
    ax1.axhline(0, color="k", lw=0.5)
    ax1.set_title(
        f"ZeRO-2, 2 ranks, {result['meta']['model']}, seq {result['meta']['seq_len']}, "
        f"mb {result['meta']['micro_batch']} x ga {result['meta']['grad_accum']}"
    )
    ax1.legend(fontsize=8)
    ax2.set_xticks(ticks, [r["link"] for r in rows])
    ax2.set_ylabel("MB per step sent by rank 0")
    ax2.set_title("bytes per step: CollectiveMeter vs veth counter")
    ax2.legend(fontsize=7)
    fig.suptitle(f"load average {result['meta']['loadavg_start']} (2 shared cores)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--quick`` replaces the defaults by a smoke setting)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", nargs="+", type=float, default=None, help="link rates in Mbit/s (0: unshaped)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="fixed one-way delay per end (needs netem)")
    p.add_argument("--variants", nargs="+", default=["stock", "agoq"], choices=list(VARIANTS))
    p.add_argument(
        "--zero-stage", type=int, choices=[2, 3], default=2, help="ZeRO stage: ds_configs/zero<stage>_*.json"
    )
    p.add_argument("--model", default=None, help="agoq_ds.testing.models shape (default 10m)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the median")
    p.add_argument("--repeats", type=int, default=2, help="runs per (rate, variant), order alternating (ABBA)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--port", type=int, default=29500, help="MASTER_PORT inside the namespaces")
    p.add_argument("--run-timeout", type=float, default=None, help="seconds per training run")
    p.add_argument("--log-dir", type=Path, help="rank logs and configs (default: a new temp dir)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, 1 Gbit/s, a few steps")
    p.add_argument("--out", type=Path, default=Path("results/network.json"))
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    defaults = (
        {"rates": [1000], "model": "tiny", "seq_len": 16, "micro_batch": 1, "grad_accum": 2, "steps": 4}
        | {"warmup": 1, "run_timeout": 300.0}
        if args.quick
        else {"rates": [1000, 10000], "model": "10m", "seq_len": 32, "micro_batch": 1, "grad_accum": 8, "steps": 12}
        | {"warmup": 3, "run_timeout": 900.0}
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.warmup >= args.steps:
        p.error("--warmup must be smaller than --steps")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table, write JSON (+ PNG); returns the result dict."""
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    write_results(result, args.out, None if args.no_plot else plot)
    return result


if __name__ == "__main__":
    main()
