"""Rank functions for the planner tests (top level, so spawn can pickle them): what a real DeepSpeed
engine on CPU allocates where the planner predicts device and host bytes. Each returns plain numbers;
the assertions live in test_planner.py."""

from __future__ import annotations

from typing import Any

import torch

from tests.integration import engine_workers as w


def zero_config(stage: int, agoq: dict | None, **zero: Any) -> dict:
    """``engine_workers.ds_config`` (tiny LLaMA, fp32, 2 accumulation steps) with extra
    ``zero_optimization`` keys; ZeRO-3 partitions every parameter (no persistence threshold)."""
    config = w.ds_config(stage, agoq)
    if stage == 3:
        zero = {"stage3_param_persistence_threshold": 0, **zero}
    config["zero_optimization"].update(zero)
    return config


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer, masters: list[torch.Tensor]) -> int:
    """Bytes of the fp32 master partitions and the Adam moments the wrapped optimizer keeps for them."""
    total = 0
    for master in masters:
        total += master.numel() * master.element_size()
        for value in optimizer.state.get(master, {}).values():
            if isinstance(value, torch.Tensor) and value.numel() == master.numel():
                total += value.numel() * value.element_size()
    return total


def zero3_device_bytes(rank: int, world: int, agoq: dict) -> dict[str, Any]:
    """ZeRO-3 with agoq, one optimizer step: the weight shards, the optimizer state and agoq's gradient
    state of this rank (the int8 accumulator's peak bytes, as its store notes them at the boundary)."""
    engine = w.make_engine(zero_config(3, agoq))
    w.train(engine, w.data_stream(rank, world), 1)
    opt = engine.optimizer
    params = list(engine.module.parameters())
    stats = engine.agoq_stats()
    return {
        "tensors": len(params),
        "weight_numel": sum(p.ds_tensor.numel() for p in params),
        "partition_numel": opt._agoq_numel,
        "optimizer_bytes": _optimizer_state_bytes(opt.optimizer, opt.fp32_partitioned_groups_flat),
        "state_bytes": stats["gradient/state_bytes"],
        "ef_bytes": stats["gradient/ef_bytes"],
        "buffer_bytes_fp32": stats["gradient/buffer_bytes_fp32"],
    }


def _host_gradient_bytes(opt: Any, stage: int) -> int:
    """fp32 host gradient bytes DeepSpeed's offloaded step reads (and at ZeRO-3 the host partition the
    micro-batches accumulate into: stock's ``grad_partitions_flat_buffer``, agoq's ``_agoq_host_flat``)."""
    if stage < 3:
        return sum(g.grad.numel() * 4 for g in opt.single_partition_of_fp32_groups)
    fp32 = sum(g.grad.numel() * 4 for g in opt.fp32_partitioned_groups_flat)
    flat = opt._agoq_host_flat if hasattr(opt, "_agoq_host_link") else opt.grad_partitions_flat_buffer
    assert flat.device.type == "cpu" and flat.dtype == torch.float32
    return fp32 + flat.numel() * 4


def offload_host_bytes(rank: int, world: int, stages: tuple[int, ...], agoq: dict) -> dict[int, dict[str, Any]]:
    """Optimizer offload (cpu) per ZeRO stage of ``stages``: the host gradient buffers of a stock engine,
    and of an agoq engine after one optimizer step (its staging buffers exist from the first boundary
    on), the host optimizer state and agoq's device gradient state. One process per rank for every
    stage: the first engine of a process pays DeepSpeed's start-up, the others about a second each."""
    out: dict[int, dict[str, Any]] = {}
    offload = {"offload_optimizer": {"device": "cpu"}}
    for stage in stages:
        stock = w.make_engine(zero_config(stage, None, **offload))
        stock_host_gradients = _host_gradient_bytes(stock.optimizer, stage)
        stock.destroy()
        engine = w.make_engine(zero_config(stage, agoq, **offload))
        w.train(engine, w.data_stream(rank, world), 1)
        opt = engine.optimizer
        masters = opt.single_partition_of_fp32_groups if stage < 3 else opt.fp32_partitioned_groups_flat
        stats = engine.agoq_stats()
        out[stage] = {
            "optimizer": type(opt).__name__,
            "tensors": len(list(engine.module.parameters())),
            "stock_host_gradients": stock_host_gradients,
            "partition_numel": sum(m.numel() for m in masters),
            "host_gradients": _host_gradient_bytes(opt, stage),
            "staging": opt._agoq_host_link.state_bytes(),
            "host_optimizer": _optimizer_state_bytes(opt.optimizer, masters),
            "state_bytes": stats["gradient/state_bytes"],
            "offload_bytes": stats["gradient/offload_bytes"],
        }
        engine.destroy()
    return out
