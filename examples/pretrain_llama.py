"""Pretrain a LLaMA-architecture HF model with DeepSpeed — with AGoQ when the config says so.

    deepspeed --num_accelerators 2 examples/pretrain_llama.py --deepspeed_config ds_configs/zero2_agoq.json

Nothing in this script is agoq-specific: the ``"agoq"`` block in the config is what turns it on (the
installed post-import hook hands ``deepspeed.initialize`` the AGoQ engine). Run it with a config
without the block for stock DeepSpeed. Data: the embedded corpus (Python standard-library source,
byte-level, no download) or ``--data FILE [FILE ...]`` for your own text.

``--out run.json`` writes the measured run (losses, held-out losses, step times, stored activation
bytes, gradient-buffer bytes, communicated bytes) for ``examples/compare_runs.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import deepspeed
import torch
import torch.distributed as torch_dist
from tqdm import tqdm

from agoq_ds.testing.data import batches, heldout_batches, load_bytes, split
from agoq_ds.testing.models import SHAPES, build_llama
from agoq_ds.testing.shutdown import end_distributed_run
from agoq_ds.testing.stats import CollectiveMeter, SavedActivationMeter, gradient_buffer_bytes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="small", help="model shape (agoq_ds.testing.models)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--data", nargs="*", help="text files to train on (default: embedded stdlib corpus)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--eval-every", type=int, default=25, help="held-out evaluation interval (steps)")
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--out", type=Path, help="write the measured run as JSON (rank 0)")
    parser.add_argument("--label", help="name of this run in --out (default: config file stem)")
    parser.add_argument(
        "--precision",
        choices=["config", "auto", "fp32"],
        default="config",
        help="compute dtype: as the config says; auto = the config's bf16 unless this is a CPU without "
        "native bf16 matmul (AVX2-only: torch's bf16 fallback is several times slower than fp32), then "
        "fp32; fp32 = drop the config's bf16/fp16 block (agoq's stored formats do not change)",
    )
    parser.add_argument(
        "--fit-schedule", action="store_true", help="stretch the config's learning-rate schedule to --steps"
    )
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    return deepspeed.add_config_arguments(parser).parse_args()


def mean_over_ranks(value: float, device: torch.device) -> float:
    """Average a Python float over data-parallel ranks (outside agoq's byte meters)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return t.item() / torch_dist.get_world_size()


@torch.no_grad()
def heldout_loss(engine, held: list[torch.Tensor]) -> float:
    engine.eval()
    losses = [engine(input_ids=b, labels=b).loss.float().item() for b in held]
    engine.train()
    return mean_over_ranks(sum(losses) / len(losses), engine.device)


def cpu_has_fast_bf16() -> bool:
    """Whether torch runs bf16 matmuls on this CPU through oneDNN's native kernels (AVX512-BF16/AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def adjusted_config(args: argparse.Namespace) -> tuple[dict | None, list[str]]:
    """The config to pass instead of ``--deepspeed_config`` when this run changes it, and what changed:
    fp32 compute per ``--precision``, and with ``--fit-schedule`` the schedule stretched to ``--steps``. ``None``:
    the file is used as it is."""
    with open(args.deepspeed_config) as f:
        config = json.load(f)
    changes = []
    half = [k for k in ("bf16", "fp16") if (config.get(k) or {}).get("enabled")]
    slow_bf16 = not torch.cuda.is_available() and not cpu_has_fast_bf16()
    if half and (args.precision == "fp32" or (args.precision == "auto" and slow_bf16)):
        for key in half:
            config.pop(key)
        reason = "no native bf16 matmul on this CPU" if args.precision == "auto" else "--precision fp32"
        changes.append(f"fp32 compute ({reason})")
    schedule = (config.get("scheduler") or {}).get("params", {})
    if args.fit_schedule and schedule.get("total_num_steps") not in (None, args.steps):
        schedule["total_num_steps"] = args.steps
        changes.append(f"learning-rate schedule over {args.steps} steps")
    return (config if changes else None), changes


def main() -> None:
    args = parse_args()
    deepspeed.init_distributed()
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    train_tokens, heldout_tokens = split(load_bytes(args.data))

    model = build_llama(args.model, seed=args.seed)
    config, changes = adjusted_config(args)
    if config is not None:
        if rank == 0:
            print(f"{args.deepspeed_config} with: " + "; ".join(changes), flush=True)
        args.deepspeed_config = None
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters(), config=config)
    is_agoq = hasattr(engine, "agoq_stats")
    micro_bs, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    data = batches(train_tokens, micro_bs, args.seq_len, seed=args.seed, rank=rank, world_size=world)
    held = [
        b[rank::world].to(engine.device)
        for b in heldout_batches(heldout_tokens, micro_bs * world, args.seq_len, args.eval_batches)
    ]

    record: dict = {
        "label": args.label or Path(args.deepspeed_config).stem,
        "agoq": is_agoq,
        "engine": type(engine).__name__,
        "world_size": world,
        "model": args.model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seq_len": args.seq_len,
        "micro_batch": micro_bs,
        "compute_dtype": "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32",
        "grad_accum": gas,
        "loss": [],
        "heldout": [],
        "step_time_s": [],
        "comm_bytes_per_step": [],
        "activation_bytes_per_micro_batch": [],
        "activation_baseline_bytes_per_micro_batch": [],
        "gradient_buffer_bytes": [],
    }
    progress = tqdm(range(args.steps), disable=rank != 0, desc=record["label"], unit="step")
    with CollectiveMeter() as meter:
        for step in progress:
            meter.reset()
            start = time.perf_counter()
            losses = []
            for micro in range(gas):
                batch = next(data).to(engine.device)
                # Baseline runs: count what autograd saves; agoq runs report their own stored bytes.
                with SavedActivationMeter(engine.module) if not is_agoq else nullcontext() as saved:
                    loss = engine(input_ids=batch, labels=batch).loss
                engine.backward(loss)
                if micro == gas - 1:
                    record["gradient_buffer_bytes"].append(gradient_buffer_bytes(engine.optimizer))
                engine.step()
                losses.append(loss.float().item())
            record["step_time_s"].append(time.perf_counter() - start)
            record["comm_bytes_per_step"].append(meter.total_sent())
            if is_agoq:
                stats = engine.agoq_stats()
                stored = stats.get("activation/stored_bytes_peak", 0.0)
                baseline = stats.get("activation/baseline_bytes_peak", 0.0)
            else:
                stored = baseline = saved.bytes
            record["activation_bytes_per_micro_batch"].append(stored)
            record["activation_baseline_bytes_per_micro_batch"].append(baseline)
            record["loss"].append(mean_over_ranks(sum(losses) / len(losses), engine.device))
            progress.set_postfix(loss=f"{record['loss'][-1]:.4f}")
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                record["heldout"].append([step + 1, heldout_loss(engine, held)])
    if is_agoq:
        record["agoq_stats"] = engine.agoq_stats()
    if rank == 0 and args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))
        print(f"wrote {args.out}")
    end_distributed_run(engine)


if __name__ == "__main__":
    main()
