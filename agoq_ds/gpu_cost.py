"""A modelled GPU cost of agoq's activation path you can read on a CPU: extra HBM bytes and launches.

What agoq adds to a step on a GPU, over stock, is kernels: a quantize per stored span in forward, a
dequantize per read in backward, and the recipes that rebuild recomputed tensors. This module counts
them per step from the planner's table of what a decoder block saves (``planner.layer_saved_tensors``)
in three states of the code:

* ``before``: as the GPU-step issue found it (d3c77e9): each stored span dequantized 1.9 times on
  average (the norm inputs 3 times, SDPA's output, the gate and up outputs twice), recipes op by op;
* ``unfused``: each span dequantized once per backward (``SavedTensor.reads``), recipes op by op
  (the CPU path);
* ``fused``: the GPU path: norm outputs and gating products rebuilt by the Triton kernels of
  ``quant/triton_rebuild.py``, which also dequantize the spans they read.

Launch counts match what ``benchmarks/launch_count.py`` counts on a real HF LLaMA (tested); the bytes
follow from the same table: a kernel reads its inputs and writes its outputs once. Stock's own reads
of saved tensors in backward are common to both and not counted. The gradient path is not included.

    agoq-ds cost --shape 0.76b
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from .config import AgoqConfig, parse_agoq_config
from .layer_classes import LayerClass
from .planner import ModelDims, Saved, head_saved_tensors, layer_saved_tensors, stored_bytes

SHAPES: dict[str, tuple[ModelDims, int, int, int]] = {
    "0.76b": (ModelDims("0.76B (H200 run)", 256, 2048, 16, 16, 8, 5632), 2048, 4, 2),
    "76m": (ModelDims("76M (H200 run)", 256, 768, 12, 12, 4, 2048), 1024, 16, 1),
}
"""``benchmarks/gpu_step.py``'s shapes: dims, sequence length, micro-batch, micro-batches per step."""

BEFORE_READS = {
    LayerClass.ATTN_NORM_INPUT: 3,
    LayerClass.MLP_NORM_INPUT: 3,
    LayerClass.EMBEDDING: 3,
    LayerClass.MLP_ACT: 2,
}
"""Dequantizes per stored span before the dequantize-once change, where not 1 (issue 23's count; the
SDPA output's second one is left out, so ``before`` is slightly under-counted)."""

STATES = ("before", "unfused", "fused")


@dataclass
class Cost:
    """Extra work of one step, over stock."""

    launches: dict[str, int] = field(default_factory=dict)
    """Kernel launches per kind."""
    read: int = 0
    """HBM bytes read."""
    written: int = 0
    """HBM bytes written."""

    def add(self, kind: str, launches: int, read: int, written: int) -> None:
        """Count ``launches`` kernels of ``kind`` reading and writing these bytes in all."""
        self.launches[kind] = self.launches.get(kind, 0) + launches
        self.read += read
        self.written += written

    @property
    def total_launches(self) -> int:
        """All launches."""
        return sum(self.launches.values())


def _norm_groups(saved: list[Saved]) -> list[tuple[Saved, Saved]]:
    """(stored input, exact row statistic) of each RMSNorm whose outputs are recomputed."""
    groups = []
    for i, t in enumerate(saved[:-1]):
        nxt = saved[i + 1]
        if t.elem_bytes == 4 and not t.exact and not t.recomputable and nxt.exact and nxt.cls == t.cls:
            groups.append((t, nxt))
    return groups


def forward_backward(saved: list[Saved], cfg: AgoqConfig, state: str, hidden: int) -> Cost:
    """Extra launches and bytes of one micro-batch's forward and backward over the tensors ``saved``."""
    table = cfg.activation.class_table()
    cost = Cost()
    stored = [t for t in saved if stored_bytes(t, table[str(t.cls.value)], cfg) < t.numel * t.elem_bytes]
    stored = [t for t in stored if not (t.recomputable and cfg.activation.recompute)]
    norms = _norm_groups(saved) if cfg.activation.recompute else []
    gates = [t for t in stored if t.cls == LayerClass.MLP_ACT] if cfg.activation.recompute else []
    fused_reads = {id(x) for x, _ in norms} | {id(t) for t in gates} if state == "fused" else set()
    for t in stored:
        full, small = t.numel * t.elem_bytes, stored_bytes(t, table[str(t.cls.value)], cfg)
        cost.add("quantize", 1, full, small)
        if id(t) in fused_reads:
            continue
        reads = BEFORE_READS.get(t.cls, 1) if state == "before" else 1
        cost.add("dequantize", reads, reads * small, reads * full)
        if t.min_bits:  # log-probabilities: stored as probabilities (exp), read back as logs
            cost.add("exp", 1, full, full)
            cost.add("log", reads, reads * full, reads * full)
    for x, stat in norms:
        n = x.numel
        if state == "fused":  # h, y and x-hat for the norm's own backward, from x's codes
            cost.add(
                "triton_norm", 1, stored_bytes(x, table[str(x.cls.value)], cfg) + stat.numel * 4 + hidden * 2, 8 * n
            )
        else:  # x * rstd, to bf16, weight * h
            cost.add("mul", 2, n * 4 + stat.numel * 4 + n * 2 + hidden * 2, n * 4 + n * 2)
            cost.add("_to_copy", 1, n * 4, n * 2)
    if len(gates) >= 2:
        for g, u in zip(gates[::2], gates[1::2], strict=False):
            n = g.numel
            if state == "fused":  # s, p, g-hat and u-hat from g's and u's codes
                small = stored_bytes(g, table[str(g.cls.value)], cfg) + stored_bytes(u, table[str(u.cls.value)], cfg)
                cost.add("triton_gate", 1, small, 4 * n * 2)
            else:  # silu(g), silu(g) * u
                cost.add("silu", 1, n * 2, n * 2)
                cost.add("mul", 1, n * 4, n * 2)
    return cost


def step_cost(shape: str, state: str, cfg: AgoqConfig | None = None) -> Cost:
    """Extra launches and bytes of one optimizer step at ``shape`` (every layer, every micro-batch)."""
    dims, seq, micro, gas = SHAPES[shape]
    return model_step_cost(dims, seq, micro, gas, state, cfg)


def model_step_cost(dims: ModelDims, seq: int, micro: int, gas: int, state: str, cfg: AgoqConfig | None = None) -> Cost:
    """``step_cost`` for any LLaMA ``dims``: ``gas`` micro-batches of ``micro`` sequences of ``seq``."""
    cfg = cfg or AgoqConfig()
    tokens = seq * micro
    per_layer = forward_backward(layer_saved_tensors(dims, tokens), cfg, state, dims.hidden)
    head = forward_backward(head_saved_tensors(dims, tokens), cfg, state, dims.hidden)
    total = Cost()
    for cost, times in ((per_layer, dims.layers * gas), (head, gas)):
        for kind, n in cost.launches.items():
            total.add(kind, n * times, 0, 0)
        total.read += cost.read * times
        total.written += cost.written * times
    return total


def format_cost(shape: str, cfg: AgoqConfig | None = None) -> str:
    """A table of the three states at ``shape``."""
    dims, seq, micro, gas = SHAPES[shape]
    lines = [
        f"{dims.name}: seq {seq}, micro-batch {micro}, {gas} micro-batch(es) per step; agoq's activation path over "
        "stock, per step",
        f"{'state':8s} {'launches':>9s} {'read GB':>8s} {'write GB':>9s}  launches by kind",
    ]
    for state in STATES:
        c = step_cost(shape, state, cfg)
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(c.launches.items(), key=lambda kv: -kv[1]))
        lines.append(f"{state:8s} {c.total_launches:9d} {c.read / 1e9:8.2f} {c.written / 1e9:9.2f}  {kinds}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    print(format_cost(args.shape, parse_agoq_config({})))
    return 0


def add_cost_command(sub: Any) -> None:
    """Register ``agoq-ds cost`` on the CLI's sub-parsers."""
    p = sub.add_parser("cost", help="modelled extra GPU launches and HBM bytes per step of agoq's activation path")
    p.add_argument("--shape", choices=sorted(SHAPES), default="0.76b")
    p.set_defaults(func=_run)


__all__ = [
    "SHAPES",
    "STATES",
    "Cost",
    "add_cost_command",
    "format_cost",
    "forward_backward",
    "model_step_cost",
    "step_cost",
]
