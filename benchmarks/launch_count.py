"""Kernel launches per training step, stock against agoq's activation path, counted on the CPU (issue 23).

On a GPU every aten op that computes is one kernel launch (views and metadata ops launch nothing), and
each launch costs 5-20 us of host time and a pass over its tensors; agoq's extra launches are its
quantize and dequantize kernels and the recipes that rebuild tensors in backward. This counts them
with a ``TorchDispatchMode`` over the forward and backward of an HF LLaMA (16 layers, 2 micro-batches
per step, the plan replayed), stock and with ``ActivationQuantizer`` installed, in two agoq modes:

* ``unfused``: the recipes op by op (the CPU path);
* ``fused``: the GPU path, where ``activation/fused_recipes.py`` rebuilds norm outputs and gating
  products in the Triton kernels of ``quant/triton_rebuild.py`` (one launch each, which also
  dequantizes their sources). Run here in Triton's interpreter (``TRITON_INTERPRET=1``, set by this
  script for that mode, in a subprocess), each kernel counted as one launch.

The counts do not depend on the width, so the tiny width stands for every width. The gradient path's
launches (the 8-bit reduction of each bucket) are not in this count.

    python benchmarks/launch_count.py [--layers 16] [--micro-batches 2] [--out results/launch_count.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_NO_LAUNCH = {"detach", "lift_fresh", "alias"}


def count(mode: str, layers: int, micro_batches: int) -> dict:
    """Launches per optimizer step (the third, replayed one) in ``mode``: stock, unfused or fused."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from agoq_ds.activation import ActivationQuantizer
    from agoq_ds.config import ActivationConfig
    from agoq_ds.testing.models import build_llama

    class Launches(TorchDispatchMode):
        paused = False
        """True inside a counted Triton launch (the interpreter's own tensor traffic is not a kernel)."""

        def __init__(self) -> None:
            super().__init__()
            self.ops: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            returns = func._schema.returns
            computes = any(str(r.type) in ("Tensor", "Tensor[]") for r in returns) and not any(
                r.alias_info is not None and not r.alias_info.is_write for r in returns
            )
            name = func.overloadpacket.__name__
            if computes and not Launches.paused and name not in _NO_LAUNCH:
                self.ops[name] += 1
            return out

    torch.manual_seed(0)
    model = build_llama("tiny", seed=0, dtype=torch.bfloat16, num_hidden_layers=layers).train()
    quantizer = ActivationQuantizer(model, ActivationConfig()).install() if mode != "stock" else None
    fused: collections.Counter = collections.Counter()
    if mode == "fused":
        from agoq_ds.quant import triton_rebuild

        for name in ("norm", "gate"):
            real = getattr(triton_rebuild, name)

            def launch(*args, _real=real, _name=name, **kwargs):
                fused[f"triton_{_name}"] += 1
                Launches.paused = True
                try:
                    return _real(*args, **kwargs)
                finally:
                    Launches.paused = False

            setattr(triton_rebuild, name, launch)
    ids = torch.randint(0, 200, (2, 64))
    for step in range(3):
        counter = Launches() if step == 2 else None
        if counter is not None:
            counter.__enter__()
            fused.clear()
        model.zero_grad(set_to_none=True)
        for _ in range(micro_batches):
            model(input_ids=ids, labels=ids).loss.backward()
        if counter is not None:
            counter.__exit__(None, None, None)
        if quantizer is not None:
            quantizer.on_step_end()
    ops = counter.ops + fused
    replayed = quantizer.engine.replayed if quantizer is not None else 0
    return {"mode": mode, "launches": sum(ops.values()), "ops": dict(ops), "replayed_forwards": replayed}


def _in_subprocess(mode: str, layers: int, micro_batches: int) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1" if mode == "fused" else "0", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", mode, "--layers", str(layers)]
    cmd += ["--micro-batches", str(micro_batches)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    """Count every mode, print the table, write JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "launch_count.json")
    p.add_argument("--one", choices=["stock", "unfused", "fused"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(count(args.one, args.layers, args.micro_batches)))
        return {}
    runs = {}
    for mode in ("stock", "unfused", "fused"):
        print(f"[launch_count] {mode} ...", flush=True)
        runs[mode] = _in_subprocess(mode, args.layers, args.micro_batches)
    stock = runs["stock"]["launches"]
    print(f"{args.layers} layers, {args.micro_batches} micro-batches, one step (forward + backward):")
    for mode, run in runs.items():
        extra = {k: v - runs["stock"]["ops"].get(k, 0) for k, v in run["ops"].items()}
        extra = {k: v for k, v in sorted(extra.items(), key=lambda kv: -kv[1]) if v}
        print(f"  {mode:8s} {run['launches']:6d} launches  {run['launches'] / stock:.3f}x of stock  extra: {extra}")
    result = {"layers": args.layers, "micro_batches": args.micro_batches, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
