"""Step time, memory and loss of stock DeepSpeed and agoq on one GPU, side by side (issue 12).

For each model shape and variant, one fresh process trains ``--steps`` ZeRO-2 optimizer steps of a
HF ``LlamaForCausalLM`` on the embedded corpus with the same seed and batches, then reports: median
step time (after ``--warmup`` steps), tokens/s, bytes the allocator holds after one forward beyond
what it held before (the saved activations), memory at rest after a step, peak memory of a step
after the warm-up and of the first step (agoq traces the model there),
host synchronisations of one steady-state step (``agoq_ds/testing/host_sync.py``), and the loss of every step;
next to each peak, the planner's prediction (``agoq_ds.planner``); whether per-forward plan replay
engaged (the activation quantizer's replayed forwards out of all its forwards), which backend the
engine's ``agoq_kernels`` picks for quantize/dequantize at 2/4/8 bits, and how often the fused Triton
rebuild kernels ran (``quant.triton_rebuild.norm/gate``, wrapped in the worker process only).

Variants: ``stock``; ``agoq`` (``"agoq": {}``); ``agoq-act`` (activations only, gradients at 32
bits); ``agoq-grad`` (8-bit gradients only); and what users pick instead of quantization:
``stock-ckpt`` (HF ``gradient_checkpointing_enable()``) and ``agoq-ckpt`` (the same with agoq's
quantizing checkpoints).

    python benchmarks/gpu_step.py                                 # both shapes, every variant, CUDA
    python benchmarks/gpu_step.py --shapes 76m --variants stock agoq --steps 12
    python benchmarks/gpu_step.py --device cpu --shapes tiny --steps 3 --warmup 1   # logic check on CPU
    python benchmarks/gpu_step.py --shapes 76m --variants stock agoq --compile       # under engine.compile()

Writes ``--out`` (JSON) and prints a table of each variant over stock.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if not __package__:  # run as a script (python benchmarks/x.py): the repository root holds the benchmarks package
    sys.path.append(str(ROOT))

SHAPES = {
    # hidden, layers, heads, kv_heads, intermediate, seq_len, micro_batch, grad_accum
    "0.76b": (2048, 16, 16, 8, 5632, 2048, 4, 2),
    "76m": (768, 12, 12, 4, 2048, 1024, 16, 1),
    "tiny": (128, 2, 4, 2, 344, 64, 2, 2),
}
"""The shapes measured on the H200 in issue 12 (byte vocabulary), and ``tiny`` for CPU logic checks."""

VARIANTS: dict[str, tuple[dict | None, bool]] = {
    "stock": (None, False),
    "agoq": ({}, False),
    "agoq-act": ({"gradient": {"enabled": False}}, False),
    "agoq-grad": ({"activation": {"enabled": False}}, False),
    "stock-ckpt": (None, True),
    "agoq-ckpt": ({}, True),
}
"""Name -> (the ``"agoq"`` block or None for stock, activation checkpointing)."""


def ds_config(shape: str, agoq: dict | None, zero_stage: int = 2) -> dict:
    """ZeRO-2 (or ``zero_stage``) bf16 AdamW (torch's, no fused-op JIT), clipping 1.0; the ``agoq`` block
    if given."""
    _, _, _, _, _, _, micro, gas = SHAPES[shape]
    cfg: dict = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "steps_per_print": 10**6,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1, "torch_adam": True}},
        "zero_optimization": {"stage": zero_stage, "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8},
    }
    if agoq is not None:
        cfg["agoq"] = agoq
    return cfg


def planner_peak(shape: str, agoq: dict | None) -> float:
    """The planner's per-GPU prediction (GiB) for one GPU, ZeRO-2, this shape and variant."""
    from agoq_ds.config import AgoqConfig
    from agoq_ds.planner import GIB, ModelDims, Parallelism, plan
    from agoq_ds.testing.data import VOCAB_SIZE

    hidden, layers, heads, kv, inter, seq, micro, gas = SHAPES[shape]
    dims = ModelDims(shape, VOCAB_SIZE, hidden, layers, heads, kv, inter)
    par = Parallelism(seq_len=seq, micro_batch=micro, micro_batches=gas, dp=1, zero=2)
    stage = plan(dims, par, AgoqConfig(**(agoq or {})))[0]
    return stage.total("agoq" if agoq is not None else "baseline") / GIB


def worker(args: argparse.Namespace) -> dict:
    """One variant in this process: train, measure, return the record."""
    import deepspeed
    import torch

    from agoq_ds.testing.data import batches, load_bytes, split
    from agoq_ds.testing.host_sync import HostSyncCounter
    from agoq_ds.testing.models import LlamaShape, build_llama

    cuda = args.device == "cuda"
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    deepspeed.init_distributed("nccl" if cuda else "gloo", verbose=False)
    hidden, layers, heads, kv, inter, seq, micro, gas = SHAPES[args.shape]
    agoq, ckpt = VARIANTS[args.variant]
    model = build_llama(LlamaShape(hidden=hidden, layers=layers, heads=heads, kv_heads=kv, intermediate=inter), seed=0)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config(args.shape, agoq, args.zero_stage)
    )
    if args.compile:
        engine.compile()  # agoq's first step runs eager, compilation happens in the next (both in the warm-up)
    device = engine.device
    fused_calls = count_fused_rebuilds()
    train, _ = split(load_bytes())
    data = batches(train, micro, seq, seed=7)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def allocated() -> int:
        return torch.cuda.memory_allocated() if cuda else 0

    losses, times, peaks, saved, syncs = [], [], [], [], None
    for step in range(args.steps):
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        # A dispatch mode makes Dynamo run the model uncompiled: no count under --compile.
        counter = HostSyncCounter() if step == args.steps - 1 and not args.compile else None
        start = time.perf_counter()
        step_losses = []
        with counter if counter is not None else nullcontext():
            for _ in range(gas):
                batch = next(data).to(device)
                before = allocated()
                loss = engine(input_ids=batch, labels=batch).loss
                saved.append(allocated() - before)
                engine.backward(loss)
                engine.step()
                step_losses.append(loss.detach())
        sync()
        times.append(time.perf_counter() - start)
        losses.append(float(torch.stack(step_losses).float().mean()))
        peaks.append(torch.cuda.max_memory_allocated() if cuda else 0)
        if counter is not None:
            syncs = counter.total
    timed = times[args.warmup :] or times
    median = statistics.median(timed)
    return {
        "shape": args.shape,
        "variant": args.variant,
        "engine": type(engine).__name__,
        "compiled": bool(args.compile),
        "median_step_s": median,
        "tokens_per_s": micro * gas * seq / median,
        "saved_bytes_after_forward": statistics.median(saved[gas:] or saved),
        "rest_bytes": allocated(),
        "peak_bytes": max(peaks[args.warmup :] or peaks),
        "first_step_peak_bytes": peaks[0],
        "planner_peak_gib": planner_peak(args.shape, agoq),
        "host_syncs_per_step": syncs,
        "loss": losses,
        "step_s": times,
        **kernel_report(engine, fused_calls),
    }


def count_fused_rebuilds() -> dict[str, int]:
    """Count calls of the fused Triton rebuild kernels (``agoq_ds.quant.triton_rebuild.norm/gate``) by
    wrapping them in this benchmark process only; empty when Triton cannot be imported here."""
    calls: dict[str, int] = {}
    try:
        from agoq_ds.quant import triton_rebuild
    except Exception:  # no Triton (CPU machines): the fused recipes cannot run, nothing to count
        return calls
    for name in ("norm", "gate"):
        fn = getattr(triton_rebuild, name, None)
        if fn is None:
            continue
        calls[name] = 0

        def counted(*a, _fn=fn, _name=name, **kw):
            calls[_name] += 1
            return _fn(*a, **kw)

        setattr(triton_rebuild, name, counted)
    return calls


def kernel_report(engine, fused_calls: dict[str, int]) -> dict:
    """Whether plan replay engaged (replayed forwards out of all outermost forwards of the activation
    quantizer) and which backend the engine's kernels pick for quantize/dequantize at 2/4/8 bits."""
    import torch

    quantizer = getattr(engine, "agoq_activation", None)
    pack = getattr(quantizer, "engine", None)
    replayed = getattr(pack, "replayed", None)
    forwards = getattr(pack, "forwards", None)
    kernels = getattr(engine, "agoq_kernels", None)
    backends = {}
    if kernels is not None:
        device = torch.device(engine.device)
        for op in ("quantize", "dequantize"):
            for bits in (2, 4, 8):
                try:
                    backends[f"{op}/{bits}"] = kernels.select(device, op, bits)
                except Exception as exc:  # a report, not a check: say what failed
                    backends[f"{op}/{bits}"] = f"error: {type(exc).__name__}"
    return {
        "replay_forwards": forwards,
        "replayed_forwards": replayed,
        "replay_engaged": bool(replayed) if replayed is not None else None,
        "backends": backends,
        "fused_rebuild_calls": dict(fused_calls) if fused_calls else None,
    }


def run_variant(shape: str, variant: str, args: argparse.Namespace) -> dict:
    """``worker`` in a fresh process (allocator, caches and compiled kernels start cold)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, __file__, "--worker", "--shape", shape, "--variant", variant, "--device", args.device]
        cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(out)]
        cmd += ["--zero-stage", str(args.zero_stage)] + (["--compile"] if args.compile else [])
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        if args.device == "cpu":
            env.setdefault("DS_ACCELERATOR", "cpu")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            return {"shape": shape, "variant": variant, "error": (proc.stdout + proc.stderr)[-3000:]}
        return json.loads(out.read_text())


def table(records: list[dict]) -> str:
    """Each variant over stock of the same shape."""
    lines = [
        f"{'shape':6s} {'variant':11s} {'step s':>8s} {'x stock':>8s} {'tok/s':>9s} {'saved GB':>9s} {'x stock':>8s} "
        f"{'rest GB':>8s} {'peak GiB':>8s} {'planner':>8s} {'step 1':>8s} {'syncs':>6s} {'loss@10':>8s} "
        f"{'replay':>9s} {'fused':>9s} backends (q/dq at 2/4/8 bits)"
    ]
    stock = {r["shape"]: r for r in records if r["variant"] == "stock" and "error" not in r}
    for r in records:
        if "error" in r:
            lines.append(f"{r['shape']:6s} {r['variant']:11s} FAILED: {r['error'].splitlines()[-1][:80]}")
            continue
        s = stock.get(r["shape"])
        t_ratio = r["median_step_s"] / s["median_step_s"] if s else float("nan")
        base_saved = s["saved_bytes_after_forward"] if s else 0
        m_ratio = r["saved_bytes_after_forward"] / base_saved if base_saved else float("nan")
        loss = r["loss"][min(9, len(r["loss"]) - 1)]
        lines.append(
            f"{r['shape']:6s} {r['variant']:11s} {r['median_step_s']:8.3f} {t_ratio:8.3f} {r['tokens_per_s']:9.0f} "
            f"{r['saved_bytes_after_forward'] / 1e9:9.3f} {m_ratio:8.3f} {r['rest_bytes'] / 1e9:8.2f} "
            f"{r['peak_bytes'] / 2**30:8.2f} {r['planner_peak_gib']:8.2f} {r['first_step_peak_bytes'] / 2**30:8.2f} "
            f"{r['host_syncs_per_step']!s:>6s} {loss:8.4f} {replay_cell(r):>9s} {fused_cell(r):>9s} "
            f"{backend_cell(r)}"
        )
    return "\n".join(lines)


def replay_cell(r: dict) -> str:
    """``replayed/forwards`` of the activation quantizer; ``-`` without one (stock, agoq-grad)."""
    if r.get("replay_forwards") is None:
        return "-"
    return f"{r['replayed_forwards']}/{r['replay_forwards']}"


def fused_cell(r: dict) -> str:
    """Calls of the fused Triton rebuild kernels, ``norm+gate``; ``-`` where Triton is not importable."""
    calls = r.get("fused_rebuild_calls")
    return f"{calls.get('norm', 0)}+{calls.get('gate', 0)}" if calls else "-"


def backend_cell(r: dict) -> str:
    """``q:a/b/c dq:a/b/c``; ``-`` for stock (no agoq kernels)."""
    b = r.get("backends") or {}
    if not b:
        return "-"
    return " ".join(
        f"{op[:1] if op == 'quantize' else 'dq'}:{'/'.join(b.get(f'{op}/{n}', '?') for n in (2, 4, 8))}"
        for op in ("quantize", "dequantize")
    )


def plot(result: dict, path: Path) -> None:
    """Step time and saved activations of every variant over stock, per shape (one PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in result["records"] if "error" not in r]
    shapes = sorted({r["shape"] for r in records})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in (
        (axes[0], "median_step_s", "median step time / stock"),
        (axes[1], "saved_bytes_after_forward", "saved activations / stock"),
    ):
        for i, shape in enumerate(shapes):
            rows = [r for r in records if r["shape"] == shape]
            base = next((r[key] for r in rows if r["variant"] == "stock"), 0) or float("nan")
            xs = [j + i * 0.4 for j in range(len(rows))]
            ax.bar(xs, [r[key] / base for r in rows], width=0.4, label=shape)
            ax.set_xticks(xs, [r["variant"] for r in rows], rotation=30)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["0.76b", "76m"], choices=sorted(SHAPES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--zero-stage", type=int, choices=[2, 3], default=2, help="ZeRO stage of every variant")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per variant")
    p.add_argument("--compile", action="store_true", help="engine.compile() every variant (issue 26)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_step.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        record = worker(args)
        args.out.write_text(json.dumps(record))
        os._exit(0)  # skip gloo/NCCL teardown at interpreter exit (see agoq_ds.testing.shutdown)
    from benchmarks._machine import machine_info, write_results

    records = []
    for shape in args.shapes:
        for variant in args.variants:
            print(f"[gpu_step] {shape} {variant} ...", flush=True)
            records.append(run_variant(shape, variant, args))
    result = {"machine": machine_info(), "device": args.device, "records": records}
    write_results(result, args.out, plot)
    print(table(records))
    return result


if __name__ == "__main__":
    main()
