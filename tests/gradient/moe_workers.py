"""DeepSpeed MoE layers under ZeRO-1/2 with 8-bit gradients, on real gloo ranks (``test_moe.py``
asserts). Top level, so spawn can pickle them."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

HIDDEN = 16
MICRO = 4
GA = 2


class MoENet(nn.Module):
    """Dense layers around two DeepSpeed MoE layers (2 experts, top-1, expert parallel ``ep_size``)."""

    def __init__(self, ep_size: int) -> None:
        from deepspeed.moe.layer import MoE

        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(HIDDEN, HIDDEN)
        expert = nn.Sequential(nn.Linear(HIDDEN, 4 * HIDDEN), nn.Tanh(), nn.Linear(4 * HIDDEN, HIDDEN))
        self.moe1 = MoE(hidden_size=HIDDEN, expert=expert, num_experts=2, ep_size=ep_size, k=1, use_rts=False)
        self.mid = nn.Linear(HIDDEN, HIDDEN)
        self.moe2 = MoE(hidden_size=HIDDEN, expert=expert, num_experts=2, ep_size=ep_size, k=1, use_rts=False)
        self.out = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = h + self.moe1(h)[0]
        h = torch.tanh(self.mid(h))
        h = h + self.moe2(h)[0]
        return ((self.out(h) - y) ** 2).mean()


def _config(stage: int, agoq: bool, min_numel: int = 0) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GA,
        "steps_per_print": 10**9,
        "optimizer": {"type": "SGD", "params": {"lr": 1.0}},
        "zero_allow_untested_optimizer": True,
        # Small buckets: expert and dense gradients share buckets, as in a real model's backward.
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 1500, "allgather_bucket_size": 1500},
    }
    if agoq:
        cfg["agoq"] = {
            "activation": {"enabled": False},  # only the gradient path differs from stock
            "gradient": {"enabled": True, "min_numel": min_numel, "rounding": "nearest", "error_feedback": True},
            "log_summary": False,
        }
    return cfg


def run(rank: int, world: int, stage: int, agoq: bool, ep_size: int, min_numel: int = 0) -> dict[str, Any]:
    """One optimizer step; each parameter's update (this rank's full view), and the optimizer type."""
    import deepspeed
    from deepspeed import comm as dist
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    from deepspeed.utils import logger, safe_get_full_fp32_param

    logger.setLevel(logging.ERROR)
    model = MoENet(ep_size)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "p"})
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=_config(stage, agoq, min_numel))

    def weights() -> dict[str, torch.Tensor]:
        return {n: safe_get_full_fp32_param(p).double().clone() for n, p in engine.module.named_parameters()}

    # Per element, the sum over micro-batches of |local gradient| (as backward produces it, before any
    # reduction): summed over each parameter's reduction group below, it is the magnitude the
    # quantization bound is taken of.
    magnitude = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}

    def track(name: str):
        def hook(grad: torch.Tensor) -> None:
            magnitude[name].add_(grad.detach().double().abs())

        return hook

    handles = [p.register_hook(track(n)) for n, p in model.named_parameters()]
    before = weights()
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(GA):
        x, y = torch.randn(MICRO, HIDDEN, generator=gen), torch.randn(MICRO, HIDDEN, generator=gen)
        engine.backward(engine(x, y))
        engine.step()
    after = weights()
    for handle in handles:
        handle.remove()
    paths = engine.agoq_param_paths() if agoq else {}
    largest_magnitude = 0.0
    for name, param in engine.module.named_parameters():
        group = groups_of(param)
        dist.all_reduce(magnitude[name], group=group)
        # DeepSpeed divides every reduced gradient by the data-parallel world size; SGD at lr 1.
        largest_magnitude = max(largest_magnitude, float(magnitude[name].max()) / dist.get_world_size())
    out = {
        "optimizer": type(engine.optimizer).__name__,
        "updates": {n: after[n] - before[n] for n in before},
        "expert": {n: not getattr(p, "allreduce", True) for n, p in engine.module.named_parameters()},
        "paths": paths,
        "magnitude": largest_magnitude,
    }
    engine.destroy()
    return out


def groups_of(param: nn.Parameter) -> Any:
    """The process group DeepSpeed reduces ``param``'s gradient over: its expert-data-parallel group for
    an expert parameter, else the data-parallel group."""
    from deepspeed.utils import groups

    if getattr(param, "allreduce", True):
        return groups._get_data_parallel_group()
    return groups._get_expert_data_parallel_group(param.group_name)


EXACT = 10**6
"""``gradient.min_numel`` above every bucket: agoq's own reduce-scatter and partition store, in fp32."""


def world4(rank: int, world: int) -> dict[str, Any]:
    """ZeRO-1 and ZeRO-2, expert parallel 2 over 4 ranks (expert-data-parallel groups of 2): stock, agoq
    through its own reduction in fp32 (``EXACT``) and in 8 bits. Per parameter the largest difference of
    each agoq update from stock's, relative to stock's largest update over the whole model."""
    out: dict[str, Any] = {}
    for stage in (1, 2):
        stock = run(rank, world, stage, False, 2)
        largest = max(float(u.abs().max()) for u in stock["updates"].values())
        row: dict[str, Any] = {"expert": stock["expert"], "magnitude": stock["magnitude"] / largest}
        for label, min_numel in (("exact", EXACT), ("8bit", 0)):
            agoq = run(rank, world, stage, True, 2, min_numel)
            row[label] = {
                "optimizer": agoq["optimizer"],
                "paths": agoq["paths"],
                "error": {
                    name: float((agoq["updates"][name] - ref).abs().max()) / largest
                    for name, ref in stock["updates"].items()
                },
            }
        out[stage] = row
    return out


def outside_zero12(rank: int, world: int, stage: int, explicit: bool) -> str:
    """MoE at a stage the 8-bit path does not reduce expert groups at: the gradient host agoq installed
    ("none": DeepSpeed's own path), or the refusal's first line."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    model = MoENet(ep_size=2)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "p"})
    config = _config(stage, True)
    if not explicit:
        config["agoq"]["gradient"] = {}  # the default block: 8-bit gradients wherever they can run
    try:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    except ValueError as exc:
        return f"refused: {str(exc).splitlines()[0]}"
    x, y = torch.randn(MICRO, HIDDEN), torch.randn(MICRO, HIDDEN)
    engine.backward(engine(x, y))
    host = engine.agoq_gradient_path()
    engine.destroy()
    return type(host).__name__ if host is not None else "none"
