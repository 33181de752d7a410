"""Rank functions for ``test_muon.py``: DeepSpeed's Muon optimizer beside agoq (real gloo ranks)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

HIDDEN = 48
MICRO = 4
GA = 2
LR = 0.02


class MuonNet(nn.Module):
    """Two weight matrices (Muon's half) with biases (the auxiliary Adam's half)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(HIDDEN, 2 * HIDDEN)
        self.down = nn.Linear(2 * HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(self.down(torch.relu(self.up(x))), y)


def muon_config(stage: int, agoq: dict[str, Any] | None) -> dict[str, Any]:
    """DeepSpeed's Muon (``"type": "Muon"``) at ``stage``, fp32; ``agoq`` the block or None."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GA,
        "steps_per_print": 10**9,
        "optimizer": {"type": "Muon", "params": {"lr": LR, "momentum": 0.9, "weight_decay": 0.0}},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 1500},
    }
    if agoq is not None:
        cfg["agoq"] = {**agoq, "log_summary": False}
    return cfg


def muon_step(rank: int, world: int, config: dict[str, Any]) -> dict[str, Any]:
    """One optimizer step of ``MuonNet``: the gradient each parameter held when the optimizer stepped
    (after the reduction), its update, and, per element, the sum over micro-batches and ranks of the
    local gradients' magnitudes divided by the world size (the quantization bound's ``S``)."""
    import deepspeed
    from deepspeed import comm as dist
    from deepspeed.utils import logger

    logger.setLevel(logging.ERROR)
    model = MuonNet()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    seen: dict[str, list] = {}
    muon = getattr(engine.optimizer, "optimizer", engine.optimizer)

    def capture(optimizer: Any, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                seen[names[id(p)]] = p.grad.detach().double().flatten().tolist()

    handle = muon.register_step_pre_hook(capture)
    magnitude = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}

    def track(name: str):
        def hook(grad: torch.Tensor) -> None:
            magnitude[name].add_(grad.detach().double().abs())

        return hook

    hooks = [p.register_hook(track(n)) for n, p in model.named_parameters()]
    before = {n: p.detach().double().clone() for n, p in engine.module.named_parameters()}
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(GA):
        x, y = torch.randn(MICRO, HIDDEN, generator=gen), torch.randn(MICRO, HIDDEN, generator=gen)
        engine.backward(engine(x, y))
        engine.step()
    handle.remove()
    for h in hooks:
        h.remove()
    largest = 0.0
    for m in magnitude.values():
        dist.all_reduce(m)
        largest = max(largest, float(m.max()) / world)
    out = {
        "optimizer": type(muon).__name__,
        "gradient_path": getattr(engine, "agoq_gradient_path", lambda: None)() is not None,
        "grads": seen,
        "updates": {
            n: (p.detach().double() - before[n]).flatten().tolist() for n, p in engine.module.named_parameters()
        },
        "use_muon": {n: bool(getattr(p, "use_muon", False)) for n, p in engine.module.named_parameters()},
        "magnitude": largest,
    }
    engine.destroy()
    return out
