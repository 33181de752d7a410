"""ZeRO-3 scenarios that run on real gloo ranks for test_stage3.py (top level, so spawn can pickle
them). Each returns plain numbers; the assertions live in the test module."""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import torch
from torch import nn

from tests.gradient.grad_workers import (
    PINNED_GRADIENT,
    SHIPPED_GRADIENT,
    _mlp_batch,
    _overflow_run,
    _plain,
    _quiet,
    _train_steps,
    ds_config,
    small_mlp,
    train_llama,
)

G = 128
HALF_STEP = 1.0 / 254 * (1 + 2.0**-18)
"""Round-to-nearest bound of an 8-bit code, relative to its group's absmax (with fp32 slack)."""


def stage3_config(ga: int = 1, bf16: bool = False, **zero: Any) -> dict:
    """A ZeRO-3 config whose parameters are all partitioned and gathered (no persistence), with a
    bucket small enough that buckets hold several parameters and some parameters do not fit one."""
    zero = {"stage3_param_persistence_threshold": 0, "reduce_bucket_size": 200, **zero}
    return ds_config(3, ga=ga, bf16=bf16, **zero)


def make_stage3_engine(model: nn.Module, config: dict, agoq: dict | None):
    """``deepspeed.initialize`` as a user calls it: an ``"agoq"`` block in the config (or none: stock)."""
    import deepspeed

    import agoq_ds  # noqa: F401  (the post-import hook patches deepspeed.initialize)

    _quiet()
    config = dict(config)
    if agoq is not None:
        config["agoq"] = {
            "activation": {"enabled": False},
            **agoq,
            "gradient": {**PINNED_GRADIENT, **agoq.get("gradient", {})},
        }
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    return engine


def _local_partition(opt, grads: dict[int, torch.Tensor], rank: int) -> torch.Tensor:
    """``rank``'s flat gradient partition (DeepSpeed's layout) of full gradients ``grads`` (by ds_id)."""
    parts = []
    for param in opt._agoq_params:
        chunk, full = param.partition_numel(), grads[param.ds_id].reshape(-1).double()
        piece = full[rank * chunk : (rank + 1) * chunk]
        parts.append(torch.nn.functional.pad(piece, (0, chunk - piece.numel())))
    return torch.cat(parts)


def _segment_bound(opt, grads: dict[int, torch.Tensor], dest: int) -> torch.Tensor:
    """Per element of ``dest``'s flat partition: the round-to-nearest bound of what one sender with
    ``grads`` puts on the wire for it (groups of G over the real, unpadded slices, bucket by bucket)."""
    pieces, where = [], []
    offset = 0
    for param in opt._agoq_params:
        chunk, full = param.partition_numel(), grads[param.ds_id].reshape(-1).double()
        piece = full[dest * chunk : (dest + 1) * chunk]
        pieces.append(piece)
        where.append(torch.arange(offset, offset + piece.numel()))
        offset += chunk
    segment, index = torch.cat(pieces), torch.cat(where)
    # Each bucket quantizes its own run of the segment in groups of G, so an element's group lies within
    # G - 1 elements of it on either side: the window's absmax bounds the group's, wherever buckets split.
    absmax = torch.nn.functional.max_pool1d(segment.abs()[None, None], 2 * G - 1, stride=1, padding=G - 1)[0, 0]
    out = torch.zeros(offset, dtype=torch.float64)
    out[index] = absmax * HALF_STEP
    return out


def _group_absmax(x: torch.Tensor) -> torch.Tensor:
    n = x.numel()
    return torch.nn.functional.pad(x.abs(), (0, -n % G)).view(-1, G).amax(dim=1).repeat_interleave(G)[:n]


def partition_checks(rank: int, world: int) -> dict[str, Any]:
    """The dequantized ZeRO-3 gradient partition after K micro-batches versus an fp32 reduce-scatter
    of the same local gradients (computed here on an unpartitioned copy of the model), against the
    bound derived from the quantizer: per micro-batch, each sender's 8-bit round-to-nearest error of
    its segment for this rank, averaged; plus the error-feedback requantization of the partition."""
    from deepspeed import comm as dist

    out = {}
    for k in (1, 4):
        model = small_mlp()
        reference = copy.deepcopy(model)
        engine = make_stage3_engine(model, stage3_config(ga=k), {})
        opt = engine.optimizer
        ids = [p.ds_id for p in engine.module.parameters()]
        gen = torch.Generator().manual_seed(1000 + rank)
        exact = None
        comm = None
        sums = []
        for micro in range(k):
            x, y = _mlp_batch(gen)
            engine.backward(nn.functional.mse_loss(engine(x), y))
            grads = torch.autograd.grad(nn.functional.mse_loss(reference(x), y) / k, list(reference.parameters()))
            full_local = torch.cat([g.reshape(-1).double() for g in grads])
            gathered = [torch.zeros_like(full_local) for _ in range(world)]
            dist.all_gather(gathered, full_local)
            step_exact = torch.zeros(sum(p.partition_numel() for p in opt._agoq_params), dtype=torch.float64)
            step_bound = torch.zeros_like(step_exact)
            for sender in range(world):
                sizes = [g.numel() for g in grads]
                split = torch.split(gathered[sender], sizes)
                sender_grads = {i: s for i, s in zip(ids, split, strict=True)}
                step_exact += _local_partition(opt, sender_grads, rank) / world
                if sender != rank:
                    step_bound += _segment_bound(opt, sender_grads, rank) / world
            exact = step_exact if exact is None else exact + step_exact
            comm = step_bound if comm is None else comm + step_bound
            sums.append(exact.clone())
            if micro < k - 1:
                engine.step()
        got = opt.grad_partitions_flat_buffer.double().clone()
        # storage: error feedback over K requantizations of partition groups aligned at 0.
        m = torch.stack([_group_absmax(s) for s in sums]).amax(dim=0) + comm
        storage = m * HALF_STEP * (1 + (k - 1) / 254)
        bound = comm + storage + exact.abs() * 2.0**-18 + 1e-12
        err = (got - exact).abs()
        out[f"k{k}"] = {
            "max_err_over_bound": float((err / bound).max()),
            "rel": float(err.norm() / exact.norm()),
            "padded": any(p.partition_numel() * world != p.ds_numel for p in opt._agoq_params),
            "type": type(opt).__name__,
        }
        engine.step()
        engine.destroy()
    return out


def _wide_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 257), nn.Tanh(), nn.Linear(257, 129), nn.Tanh(), nn.Linear(129, 7))


def bytes_checks(rank: int, world: int) -> dict[str, Any]:
    """Bytes on the wire and gradient-partition bytes per step, agoq ZeRO-3 versus the meter's
    baselines, and versus a count of what stock ZeRO-3 hands to its reduce-scatter collective."""
    from deepspeed import comm as dist

    out = {}
    for name, agoq in (("agoq", {}), ("stock", None)):
        engine = make_stage3_engine(_wide_mlp(), stage3_config(ga=2, reduce_bucket_size=20000), agoq)
        sent = {"bytes": 0.0}
        original = dist.reduce_scatter_fn

        def counting(output, tensor, *args, original=original, sent=sent, **kwargs):
            sent["bytes"] += (world - 1) / world * tensor.numel() * tensor.element_size()
            return original(output, tensor, *args, **kwargs)

        gen = torch.Generator().manual_seed(3 + rank)
        for step in range(2):
            for _ in range(2):
                x = torch.randn(4, 64, generator=gen)
                y = torch.randn(4, 7, generator=gen)
                dist.reduce_scatter_fn = counting if step == 1 else original
                try:
                    engine.backward(nn.functional.mse_loss(engine(x), y))
                finally:
                    dist.reduce_scatter_fn = original
                engine.step()
        stats = engine.optimizer.agoq_stats() if agoq is not None else {}
        out[name] = {"stats": stats, "reduce_scatter_bytes": sent["bytes"]}
        engine.destroy()
    return out


def overflow_checks(rank: int, world: int) -> dict[str, Any]:
    """Inf/NaN injected on rank 0 in step 1 at ZeRO-3: the same outcome as stock DeepSpeed."""
    out = {}
    for name, (bf16, value) in {"s3_fp32_inf": (False, float("inf")), "s3_bf16_nan": (True, float("nan"))}.items():
        zero = {"stage3_param_persistence_threshold": 0}
        out[name] = {
            "stock": _overflow_run(rank, 3, bf16, None, value, **zero),
            "agoq": _overflow_run(rank, 3, bf16, {}, value, **zero),
        }
    return out


def _residual(engine) -> torch.Tensor | None:
    from agoq_ds.gradient.store import STATE_KEY

    state = engine.optimizer.state_dict()[STATE_KEY]["per_step_residuals"]["partition"]
    return None if state is None else torch.cat([state["codes"].float(), state["scales"]])


def checkpoint_checks(rank: int, world: int, directory: str) -> dict[str, Any]:
    """Save at ZeRO-3 with the error-feedback residual, resume, compare with the uninterrupted run;
    stock <-> agoq checkpoints load both ways; the 16-bit model save is unaffected."""
    from agoq_ds.gradient.store import STATE_KEY

    ga = 3
    agoq = {"gradient": {"error_feedback": True}}
    path = os.path.join(directory, "stage3")
    save_16bit = {"stage3_gather_16bit_weights_on_model_save": True}
    engine = make_stage3_engine(small_mlp(), stage3_config(ga=ga, **save_16bit), agoq)
    gen = torch.Generator().manual_seed(50 + rank)
    _train_steps(engine, gen, 3, ga)
    engine.save_checkpoint(path, tag="t3")
    saved = _residual(engine)
    state = gen.get_state()
    uninterrupted = _train_steps(engine, gen, 3, ga)

    resumed_engine = make_stage3_engine(small_mlp(seed=1), stage3_config(ga=ga), agoq)
    resumed_engine.load_checkpoint(path, tag="t3")
    loaded = _residual(resumed_engine)
    gen.set_state(state)
    resumed = _train_steps(resumed_engine, gen, 3, ga)

    without_ef = make_stage3_engine(small_mlp(seed=1), stage3_config(ga=ga), agoq)
    without_ef.load_checkpoint(path, tag="t3")
    without_ef.optimizer.agoq_store.step_accumulator("partition").reset_residual()
    gen.set_state(state)
    resumed_without_ef = _train_steps(without_ef, gen, 3, ga)

    stock = make_stage3_engine(small_mlp(seed=1), stage3_config(ga=ga, **save_16bit), None)
    stock.load_checkpoint(path, tag="t3")
    gen.set_state(state)
    stock_losses = _train_steps(stock, gen, 1, ga)
    stock_path = os.path.join(directory, "stock3")
    stock.save_checkpoint(stock_path, tag="s")
    from_stock = make_stage3_engine(small_mlp(seed=1), stage3_config(ga=ga), agoq)
    from_stock.load_checkpoint(stock_path, tag="s")
    residual = _residual(from_stock)

    shapes = {}
    for name, which in (("agoq", engine), ("stock", stock)):
        model_dir = os.path.join(directory, f"model16_{name}")
        which.save_16bit_model(model_dir)
        if rank == 0:
            saved_model = torch.load(os.path.join(model_dir, "pytorch_model.bin"), weights_only=True)
            shapes[name] = {k: list(v.shape) for k, v in saved_model.items()}
    entry = engine.optimizer.state_dict()[STATE_KEY]
    return {
        "residual_nonzero": saved is not None and bool(torch.count_nonzero(saved)),
        "residual_restored": saved is not None and loaded is not None and torch.equal(saved, loaded),
        "uninterrupted": uninterrupted,
        "resumed": resumed,
        "resumed_without_ef": resumed_without_ef,
        "stock_loads_agoq": math.isfinite(stock_losses[0]),
        "agoq_loads_stock_zero_residual": residual is None or not bool(torch.count_nonzero(residual)),
        "plain_state": _plain(entry),
        "model_shapes": shapes,
    }


def reshard_checks(rank: int, world: int, ckpt_dir: str, universal_tag: str) -> dict[str, Any]:
    """The 2-rank ZeRO-3 checkpoint of ``checkpoint_checks``, converted to a universal checkpoint, loaded
    on ``world`` ranks by stock DeepSpeed and by agoq: weights, residual, the next losses."""
    import deepspeed

    out = {}
    for name, agoq in (("stock", None), ("agoq", {"gradient": {"error_feedback": True}})):
        config = stage3_config(ga=3)
        config["checkpoint"] = {"load_universal": True}
        engine = make_stage3_engine(small_mlp(seed=1), config, agoq)
        engine.load_checkpoint(ckpt_dir, tag=universal_tag)
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            params = torch.cat([p.detach().reshape(-1).clone() for p in engine.module.parameters()])
        residual = _residual(engine) if agoq is not None else None
        gen = torch.Generator().manual_seed(70 + rank)
        out[name] = {
            "params": params.tolist(),
            "global_steps": engine.global_steps,
            "residual_zero": residual is None or not bool(torch.count_nonzero(residual)),
            "losses": _train_steps(engine, gen, 2, 3),
        }
        engine.destroy()
    return out


def parity_checks(rank: int, world: int, steps: int) -> dict[str, Any]:
    """Stock ZeRO-3 versus agoq ZeRO-3 (8-bit reduce-scatter and partition), tiny LLaMA, same data."""
    out = {}
    for bf16 in (True, False):
        name = f"s3_{'bf16' if bf16 else 'fp32'}"
        out[name] = {
            "stock": train_llama(rank, world, 3, bf16, None, steps),
            "agoq": train_llama(rank, world, 3, bf16, {}, steps),
        }
    out["s3_bf16_shipped"] = {
        "stock": out["s3_bf16"]["stock"],
        "agoq": train_llama(rank, world, 3, True, {"gradient": SHIPPED_GRADIENT}, steps),
    }
    return out


def world2(rank: int, world: int, directory: str, parity_steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "partition": partition_checks(rank, world),
        "bytes": bytes_checks(rank, world),
        "overflow": overflow_checks(rank, world),
        "checkpoint": checkpoint_checks(rank, world, directory),
        "parity": parity_checks(rank, world, parity_steps),
    }


def world_n(rank: int, world: int) -> dict[str, Any]:
    return {"partition": partition_checks(rank, world)}
