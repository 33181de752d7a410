"""Rank functions of test_gradient_inputs.py (top level for spawn; torch and DeepSpeed only, no
transformers import, so a world of 4 starts quickly).

The model mixes every parameter situation the gradient path must survive: odd sizes that straddle
partitions, a parameter larger than a bucket, a frozen layer, a branch used only on even steps (no
gradient in odd steps), a layer never used (no gradient ever) and, in a second param group, biases.
At every accumulation boundary the gradient each parameter will be stepped with
(``safe_get_full_grad``) is compared with an fp64 reference built from every rank's local
gradients; parameters are compared with stock DeepSpeed after the run.
"""

from __future__ import annotations

import copy
import io
import logging
from typing import Any

import torch
from torch import nn

GA = 2
"""Micro-batches per optimizer step."""
STEPS = 4


class Mixed(nn.Module):
    """See the module docstring; ``forward(x, step)`` uses ``branch`` only on even steps."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(7, 13)
        self.frozen.requires_grad_(False)
        self.body = nn.Linear(13, 17)
        self.wide = nn.Linear(17, 61)  # 1098 elements: larger than the 200-element bucket below
        self.branch = nn.Linear(61, 5)
        self.never = nn.Linear(3, 3)
        self.head = nn.Linear(61, 3)

    def forward(self, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
        h = torch.tanh(self.wide(torch.tanh(self.body(torch.tanh(self.frozen(x))))))
        out = self.head(h)
        if use_branch:
            out = out + self.branch(h)[:, :3]
        return out


class Tiny(nn.Module):
    """Two parameters in all: with 3-4 ranks most partitions hold only padding."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
        return self.lin(x[:, :1]).expand(-1, 3)


def _config(stage: int, bf16: bool, **zero: Any) -> dict:
    zero_cfg = {"stage": stage, "reduce_bucket_size": 200, "allgather_bucket_size": 200, "overlap_comm": False}
    zero_cfg.update(zero)
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": GA,
        "steps_per_print": 10**9,
        "zero_optimization": zero_cfg,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "bf16": {"enabled": bf16},
    }


def _group(name: str) -> int:
    """Param group of ``name`` in ``_engine``: 0 weights, 1 biases (each group is one flat buffer)."""
    return 1 if name.endswith("bias") else 0


def _engine(model: nn.Module, config: dict, agoq: dict | None):
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.ERROR)
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and p.requires_grad]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias") and p.requires_grad]
    groups = [{"params": weights, "weight_decay": 0.1}, {"params": biases, "weight_decay": 0.0}]
    if agoq is not None:
        config = {**config, "agoq": agoq}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=copy.deepcopy(config))
    return engine


def _run(rank: int, world: int, model: nn.Module, config: dict, agoq: dict | None) -> dict[str, Any]:
    from deepspeed import comm as dist
    from deepspeed.utils import safe_get_full_grad

    reference = copy.deepcopy(model).double()
    engine = _engine(model, config, agoq)
    names = [n for n, _ in engine.module.named_parameters()]
    gen = torch.Generator().manual_seed(100 + rank)
    dtype = next(engine.module.parameters()).dtype
    worst: dict[str, float] = {}
    steps_off: dict[str, float] = {}
    zero_exact: dict[str, bool] = {}
    buffers: list[int] = []
    for step in range(STEPS):
        use_branch = step % 2 == 0
        reference.load_state_dict({k: v.double() for k, v in engine.module.state_dict().items()})
        local = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in reference.named_parameters()}
        # Largest |partial sum| a quantizer of each param group's flat buffer saw on any rank: it bounds
        # every group scale (amax / 127) the 8-bit path used this step.
        amax = torch.zeros(2, dtype=torch.float64)
        for micro in range(GA):
            x, y = torch.randn(4, 7, generator=gen), torch.randn(4, 3, generator=gen)
            loss = nn.functional.mse_loss(engine(x.to(dtype), use_branch).float(), y)
            engine.backward(loss)
            ref_loss = nn.functional.mse_loss(reference(x.double(), use_branch), y.double()) / GA
            trainable = [(n, q) for n, q in reference.named_parameters() if q.requires_grad]
            grads = torch.autograd.grad(ref_loss, [q for _, q in trainable], allow_unused=True)
            for (n, _), g in zip(trainable, grads, strict=True):
                if g is not None:
                    local[n] += g
                    amax[_group(n)] = max(float(amax[_group(n)]), float(local[n].abs().max()))
            if micro < GA - 1:
                engine.step()
        for n in names:
            dist.all_reduce(local[n])
            local[n] /= world
        dist.all_reduce(amax, op=dist.ReduceOp.MAX)
        for n, p in engine.module.named_parameters():
            if not p.requires_grad:
                continue
            got = safe_get_full_grad(p)
            got = torch.zeros_like(local[n]) if got is None else got.double().reshape(local[n].shape)
            ref = local[n]
            if float(ref.norm()) == 0:
                zero_exact[f"{n}@{step}"] = bool(torch.count_nonzero(got) == 0)
            else:
                worst[n] = max(worst.get(n, 0.0), float((got - ref).norm() / ref.norm()))
                step_size = float(amax[_group(n)]) / 127
                steps_off[n] = max(steps_off.get(n, 0.0), float((got - ref).abs().max()) / step_size)
        engine.step()
        opt = engine.optimizer
        store = getattr(opt, "agoq_store", None)
        buffers.append(sum(a.nbytes for a in store.accumulators()) if store is not None else 0)
    return {
        "optimizer": type(engine.optimizer).__name__,
        "worst_rel": worst,
        "worst_steps": steps_off,
        "zero_exact": zero_exact,
        "params": {n: p.detach().float().clone() for n, p in engine.module.named_parameters()},
        "buffers": buffers,
    }


CASES: dict[str, tuple[str, int, bool, dict[str, Any]]] = {
    "s2": ("mixed", 2, False, {}),
    "s2_noncontiguous": ("mixed", 2, False, {"contiguous_gradients": False}),
    "s2_bf16": ("mixed", 2, True, {}),
    "s1": ("mixed", 1, False, {}),
    "s2_tiny": ("tiny", 2, False, {}),
    "s1_tiny": ("tiny", 1, False, {}),
}
"""name -> (model, ZeRO stage, bf16, extra zero_optimization settings)."""


def pack(result: Any) -> bytes:
    """``result`` serialised with ``torch.save``: tensors cannot travel through ``run_ranks``' queue
    (their shared memory goes away with the process)."""
    buf = io.BytesIO()
    torch.save(result, buf)
    return buf.getvalue()


def unpack(results: list[bytes]) -> list[Any]:
    """What ``pack`` produced, per rank (loaded with ``weights_only``: plain data only)."""
    return [torch.load(io.BytesIO(r), weights_only=True) for r in results]


def gradient_inputs(rank: int, world: int) -> bytes:
    """Every case with the shipped agoq gradient defaults and with stock DeepSpeed."""
    out = {}
    for name, (model_name, stage, bf16, zero) in CASES.items():
        config = _config(stage, bf16, **zero)
        runs = {}
        for label, agoq in (("stock", None), ("agoq", {"activation": {"enabled": False}, "log_summary": False})):
            model = Mixed() if model_name == "mixed" else Tiny()
            initial = {n: p.detach().float().clone() for n, p in model.named_parameters()}
            runs[label] = _run(rank, world, model, config, agoq)
            runs[label]["initial"] = initial
        out[name] = runs
    return pack(out)
