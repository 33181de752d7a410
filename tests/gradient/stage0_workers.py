"""Scenarios for test_stage0_pipeline.py: 8-bit gradients without ZeRO partitioning (ZeRO stage 0,
``BF16_Optimizer``) and in the pipeline engine, on real gloo ranks through the AGoQ engines (the
zero-code hook builds them when the config has an ``"agoq"`` block). Each returns plain numbers; the
assertions live in the test module.

Routes exercised (DeepSpeed 0.19.8 picks them; agoq follows):

* ``s0_fp32``:  ZeRO 0, fp32              -> basic optimizer, engine all-reduce of ``param.grad``
* ``s0_bf16``:  ZeRO 0, bf16              -> ``FP16_UnfusedOptimizer`` in bf16 (bf16 ``param.grad``)
* ``s1_bf16_fp32acc``: ZeRO 1, bf16, ``grad_accum_dtype: fp32`` -> ``BF16_Optimizer``
* pipeline (2 stages x 2 data-parallel): ZeRO 0 fp32, ZeRO 0 bf16 (``BF16_Optimizer``, bf16
  accumulation), ZeRO 1 bf16 (ZeRO optimizer), ZeRO 1 bf16 + fp32 accumulation (``BF16_Optimizer``)
"""

from __future__ import annotations

import copy
import hashlib
import io
import itertools
import logging
import math
import os
from typing import Any

import torch
from torch import nn

G = 128
"""Quantization group size (the default)."""

ROUTES = {
    "s0_fp32": {"stage": 0, "bf16": False},
    "s0_bf16": {"stage": 0, "bf16": True},
    "s1_bf16_fp32acc": {"stage": 1, "bf16": True, "grad_accum_dtype": "fp32"},
}
"""Data-parallel routes without ZeRO gradient partitioning: DeepSpeed config settings."""

PIPE_ROUTES = {
    "s0_fp32": {"stage": 0, "bf16": False},
    "s0_bf16": {"stage": 0, "bf16": True},
    "s1_bf16": {"stage": 1, "bf16": True},
    "s1_bf16_fp32acc": {"stage": 1, "bf16": True, "grad_accum_dtype": "fp32"},
}
"""Pipeline routes (ZeRO 0 and 1, the two allowed with pipeline parallelism)."""


def _quiet() -> None:
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def ds_config(route: dict, *, ga: int, agoq: dict | None, micro: int = 4, lr: float = 1e-2, clip: float = 0.0) -> dict:
    """A DeepSpeed config for ``route``; ``agoq`` is the gradient block (activations stay off so
    that only the gradient path differs from stock), or None for stock DeepSpeed."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": ga,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": route["stage"]},
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "torch_adam": True}},
        "bf16": {"enabled": route["bf16"]},
        "gradient_clipping": clip,
    }
    if "grad_accum_dtype" in route:
        cfg["data_types"] = {"grad_accum_dtype": route["grad_accum_dtype"]}
    if agoq is not None:
        # min_numel 0: the test MLP's parameters are all smaller than the default, which keeps them fp32.
        cfg["agoq"] = {"activation": {"enabled": False}, "gradient": {"min_numel": 0, **agoq}, "log_summary": False}
    return cfg


def make_engine(model: nn.Module, config: dict):
    """``deepspeed.initialize`` (the post-import hook picks the AGoQ engine for an agoq config)."""
    import deepspeed

    _quiet()
    engine, *_ = deepspeed.initialize(model=model, config=copy.deepcopy(config), model_parameters=model.parameters())
    return engine


def mlp(seed: int = 0) -> nn.Module:
    """An MLP with odd-sized parameters (1 069 elements) and one frozen bias."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 40), nn.Tanh(), nn.Linear(40, 19), nn.Tanh(), nn.Linear(19, 3))
    model[2].bias.requires_grad_(False)
    return model


def _batch(gen: torch.Generator, dtype: torch.dtype, micro: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(micro, 7, generator=gen).to(dtype), torch.randn(micro, 3, generator=gen).to(dtype)


def _digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


# --- (1) gradient after accumulation + all-reduce versus fp32, within the analytic bound -------------


def _group_max(x: torch.Tensor, segments: list[tuple[int, int]]) -> torch.Tensor:
    """Per element, ``max |x|`` over its quantization group: groups of ``G`` aligned at each segment start."""
    out = torch.zeros_like(x)
    for start, n in segments:
        seg = x[start : start + n].abs()
        pad = -n % G
        out[start : start + n] = torch.nn.functional.pad(seg, (0, pad)).view(-1, G).amax(dim=1).repeat_interleave(G)[:n]
    return out


def accumulation_bound(
    local: torch.Tensor, quantized_adds: int, storage: list[tuple[int, int]], comm: list[tuple[int, int]], step: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact averaged gradient and the per-element bound of ``|8-bit result - exact|``.

    ``local[r, k]`` is rank r's gradient of micro-batch k (fp64, flat coordinates). The int8
    accumulator requantizes after each of the first ``quantized_adds`` micro-batches (groups aligned to
    the ``storage`` segments), the remaining ones are added exactly; then ``all_reduce_8bit`` over the
    ``comm`` chunks: each sender quantizes its value for every other owner, the owner sums in fp32,
    scales by 1/N and quantizes once more for the all-gather. One quantization errs by at most
    ``step`` times the group's absmax / 127 (1 for stochastic rounding, 1/2 for round-to-nearest), and the
    absmax of an accumulated value is at most that of the exact sum plus the error so far.
    """
    n_ranks, k_total, _ = local.shape
    slack = 1 + 2.0**-20
    own = torch.zeros(local.shape[-1], dtype=torch.long)
    for owner, (start, n) in enumerate(comm):
        own[start : start + n] = owner
    exact = local.sum(dim=(0, 1)) / n_ranks
    storage_err, sends = [], []
    for r in range(n_ranks):
        err = torch.zeros_like(exact)
        total = torch.zeros_like(exact)
        for k in range(k_total):
            total = total + local[r, k]
            if k < quantized_adds:
                err = err + step * slack * _group_max(total.abs() + err, storage) / 127
        storage_err.append(err)
        send = step * slack * _group_max(total.abs() + err, comm) / 127
        sends.append(torch.where(own == r, torch.zeros_like(send), send))
    reduce_scatter = (sum(storage_err) + sum(sends)) / n_ranks
    final = step * slack * _group_max(exact.abs() + reduce_scatter, comm) / 127
    rounding = (exact.abs() + local.abs().sum(dim=(0, 1)) / n_ranks) * 2.0**-20 + 1e-30
    return exact, reduce_scatter + final + rounding


def _even_chunks(n: int, world: int) -> list[tuple[int, int]]:
    from agoq_ds.gradient.collectives import even_owner_map

    return [slices[0] if slices else (n, 0) for slices in even_owner_map(n, world)]


def _offsets(params: list[nn.Parameter]) -> list[int]:
    """0, then the end offset of each parameter in the flat concatenation."""
    return [0, *itertools.accumulate(p.numel() for p in params)]


def _capture(params: list[nn.Parameter]) -> list[list[torch.Tensor]]:
    """Record every parameter's gradient of each backward (before accumulation), flat fp64."""
    captured: list[list[torch.Tensor]] = [[] for _ in params]
    for i, p in enumerate(params):
        p.register_hook(lambda g, store=captured[i]: store.append(g.detach().double().reshape(-1)))
    return captured


def _accumulation_case(rank: int, world: int, route_name: str, rounding: str, step: float, k: int) -> dict:
    from deepspeed import comm as dist

    route = ROUTES[route_name]
    dtype = torch.bfloat16 if route["bf16"] else torch.float32
    engine = make_engine(mlp(), ds_config(route, ga=k, agoq={"rounding": rounding}))
    params = [p for p in engine.module.parameters() if p.requires_grad]
    captured = _capture(params)
    gen = torch.Generator().manual_seed(100 + rank)
    for micro in range(k):
        x, y = _batch(gen, dtype)
        engine.backward(nn.functional.mse_loss(engine(x), y))
        if micro < k - 1:
            engine.step()
    # Now reduced, before the step: BF16_Optimizer's flat buffer, or param.grad on the stage-0 path.
    bf16_path = route_name != "s0_fp32"
    n = sum(p.numel() for p in params)
    length = engine.optimizer.fp32_groups_gradients_flat[0].numel() if bf16_path else n
    local = torch.zeros(world, k, length, dtype=torch.float64)
    local[rank, :, :n] = torch.stack([torch.cat([c[j] for c in captured]) for j in range(k)])
    dist.all_reduce(local)
    if bf16_path:
        got = engine.optimizer.fp32_groups_gradients_flat[0].double()
        storage, folds = [(0, length)], k
    else:
        got = torch.cat([p.grad.double().reshape(-1) for p in params])
        storage, folds = [(a, b - a) for a, b in itertools.pairwise(_offsets(params))], k - 1
    exact, bound = accumulation_bound(local, folds, storage, _even_chunks(length, world), step)
    err = (got - exact).abs()
    result = {
        "max_err_over_bound": float((err / bound).max()),
        "rel": float(err.norm() / exact.norm()),
        "rel_bound": float(bound.norm() / exact.norm()),
        "digest": _digest([got]),
        "optimizer": type(engine.optimizer).__name__,
    }
    engine.step()
    return result


def accumulation_checks(rank: int, world: int) -> dict[str, Any]:
    """Gradient after K = 1, 8, 32 micro-batches (8-bit accumulation, 8-bit all-reduce) versus the
    exact fp64 average of the same local gradients, for the param.grad path and BF16_Optimizer."""
    out: dict[str, Any] = {}
    for route_name in ("s0_fp32", "s1_bf16_fp32acc"):
        for rounding, step in (("stochastic", 1.0), ("nearest", 0.5)):
            for k in (1, 8, 32):
                out[f"{route_name}_{rounding}_k{k}"] = _accumulation_case(rank, world, route_name, rounding, step, k)
    return out


# --- (2) Inf / NaN: the same outcome as stock -----------------------------------------------------


def _overflow_run(rank: int, route: dict, agoq: dict | None, value: float) -> dict[str, Any]:
    engine = make_engine(mlp(), ds_config(route, ga=2, agoq=agoq, clip=1.0))
    weight = engine.module[0].weight
    inject = {"on": False}

    def hook(grad: torch.Tensor) -> torch.Tensor:
        if inject["on"] and rank == 0:
            grad = grad.clone()
            grad[3, 2] = value
        return grad

    weight.register_hook(hook)
    gen = torch.Generator().manual_seed(7 + rank)
    dtype = torch.bfloat16 if route["bf16"] else torch.float32
    rows = []
    for step in range(4):
        for micro in range(2):
            inject["on"] = step == 1 and micro == 0
            x, y = _batch(gen, dtype)
            engine.backward(nn.functional.mse_loss(engine(x), y))
            engine.step()
        norm = engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        rows.append(
            {
                "overflow": bool(getattr(engine.optimizer, "overflow", False)),
                "norm_finite": math.isfinite(norm),
                "params_finite": all(bool(torch.isfinite(p).all()) for p in engine.module.parameters()),
            }
        )
    return {"rows": rows, "skipped": int(engine.skipped_steps)}


def overflow_checks(rank: int, world: int) -> dict[str, Any]:
    """Inf/NaN injected on rank 0 in the first micro-batch of step 1, stock versus agoq."""
    out = {}
    for name, route in ROUTES.items():
        for label, value in (("inf", float("inf")), ("nan", float("nan"))):
            out[f"{name}_{label}"] = {
                "stock": _overflow_run(rank, route, None, value),
                "agoq": _overflow_run(rank, route, {}, value),
            }
    return out


# --- (3) training parity with stock DeepSpeed ----------------------------------------------------


def train_llama(rank: int, world: int, route: dict, agoq: dict | None, steps: int, ga: int = 2) -> dict[str, Any]:
    """``build_llama("tiny")`` on the embedded corpus; the global mean loss of every step."""
    from deepspeed import comm as dist

    from agoq_ds.testing.data import batches, load_bytes, split
    from agoq_ds.testing.models import build_llama

    config = ds_config(route, ga=ga, agoq=agoq, micro=2, lr=2e-3, clip=1.0)
    engine = make_engine(build_llama("tiny", seed=0), config)
    train, _ = split(load_bytes(max_bytes=400_000))
    data = batches(train, 2, 64, seed=0, rank=rank, world_size=world)
    losses = []
    for _ in range(steps):
        total = torch.zeros(1, dtype=torch.float64)
        for _ in range(ga):
            tokens = next(data)
            loss = engine(input_ids=tokens, labels=tokens).loss
            engine.backward(loss)
            engine.step()
            total += float(loss)
        dist.all_reduce(total)
        losses.append(float(total) / (ga * world))
    stats = engine.agoq_stats() if hasattr(engine, "agoq_stats") else {}
    return {
        "losses": losses,
        "engine": type(engine).__name__,
        "optimizer": type(engine.optimizer).__name__,
        "stats": {k: v for k, v in stats.items() if k.startswith("gradient/")},
        "params": _digest(list(engine.module.parameters())),
    }


def parity_checks(rank: int, world: int, steps: int) -> dict[str, Any]:
    """Stock DeepSpeed versus the 8-bit path (shipped defaults), same seed and data, every route."""
    return {
        name: {
            "stock": train_llama(rank, world, route, None, steps),
            "agoq": train_llama(rank, world, route, {}, steps),
        }
        for name, route in ROUTES.items()
    }


# --- (4) checkpoints ------------------------------------------------------------------------------


def _train_mlp(engine, gen: torch.Generator, steps: int, ga: int, dtype: torch.dtype) -> list[float]:
    losses = []
    for _ in range(steps):
        for _ in range(ga):
            x, y = _batch(gen, dtype)
            loss = nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
        losses.append(float(loss))
    return losses


def _agoq_state(engine) -> dict[str, Any] | None:
    if engine.agoq_param_gradients is not None:
        return engine.agoq_param_gradients.agoq_rank_state()
    from agoq_ds.gradient.store import STATE_KEY

    return engine.optimizer.state_dict().get(STATE_KEY)


def _residual_tensors(state: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    out = {}
    residuals = {**(state or {}).get("per_step_residuals", {}), **(state or {}).get("carried_residuals", {})}
    for key, value in residuals.items():
        if value is not None:
            out[f"{key}/codes"], out[f"{key}/scales"] = value["codes"], value["scales"]
    return out


def _plain(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, int | str) and _plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, torch.Tensor | int | float | str | bool)


def checkpoint_checks(rank: int, world: int, directory: str) -> dict[str, Any]:
    """Save (with error-feedback state), resume, compare with the uninterrupted run; stock <-> agoq."""
    out = {}
    ga = 3
    agoq = {"error_feedback": True}
    for name in ("s0_fp32", "s1_bf16_fp32acc"):
        route = ROUTES[name]
        dtype = torch.bfloat16 if route["bf16"] else torch.float32
        path = os.path.join(directory, name)
        engine = make_engine(mlp(), ds_config(route, ga=ga, agoq=agoq))
        gen = torch.Generator().manual_seed(50 + rank)
        _train_mlp(engine, gen, 2, ga, dtype)
        engine.save_checkpoint(path, tag="t2")
        saved = _agoq_state(engine)
        rng = gen.get_state()
        uninterrupted = _train_mlp(engine, gen, 2, ga, dtype)

        resumed_engine = make_engine(mlp(seed=1), ds_config(route, ga=ga, agoq=agoq))
        resumed_engine.load_checkpoint(path, tag="t2")
        loaded = _residual_tensors(_agoq_state(resumed_engine))
        gen.set_state(rng)
        resumed = _train_mlp(resumed_engine, gen, 2, ga, dtype)

        stock = make_engine(mlp(seed=1), ds_config(route, ga=ga, agoq=None))
        stock.load_checkpoint(path, tag="t2")
        gen.set_state(rng)
        stock_losses = _train_mlp(stock, gen, 1, ga, dtype)
        stock_path = os.path.join(directory, f"stock_{name}")
        stock.save_checkpoint(stock_path, tag="s")
        from_stock = make_engine(mlp(seed=1), ds_config(route, ga=ga, agoq=agoq))
        from_stock.load_checkpoint(stock_path, tag="s")
        from_stock_residuals = _residual_tensors(_agoq_state(from_stock))
        gen.set_state(rng)
        from_stock_losses = _train_mlp(from_stock, gen, 1, ga, dtype)

        buf = io.BytesIO()
        torch.save(saved, buf)
        buf.seek(0)
        reloaded = torch.load(buf, weights_only=True)
        files = sorted(os.listdir(os.path.join(path, "t2")))
        saved_residuals = _residual_tensors(saved)
        out[name] = {
            "residual_nonzero": any(int(torch.count_nonzero(v)) > 0 for v in saved_residuals.values()),
            "residual_restored": saved_residuals.keys() == loaded.keys()
            and all(torch.equal(saved_residuals[k], loaded[k]) for k in loaded),
            "uninterrupted": uninterrupted,
            "resumed": resumed,
            "stock_loads_agoq": math.isfinite(stock_losses[0]),
            "agoq_loads_stock": math.isfinite(from_stock_losses[0]),
            "agoq_from_stock_zero_residual": all(
                int(torch.count_nonzero(v)) == 0 for v in from_stock_residuals.values()
            ),
            "plain_state": _plain(saved),
            "weights_only_ok": reloaded.keys() == saved.keys(),
            "files": files,
        }
    return out


def world2(rank: int, world: int, directory: str, parity_steps: int) -> dict[str, Any]:
    """Everything that runs on two data-parallel ranks."""
    torch.manual_seed(0)
    return {
        "accumulation": accumulation_checks(rank, world),
        "overflow": overflow_checks(rank, world),
        "checkpoint": checkpoint_checks(rank, world, directory),
        "parity": parity_checks(rank, world, parity_steps),
    }


# --- (5) pipeline: 2 stages x 2 data-parallel ranks ---------------------------------------------------


def _pipeline_engine(route: dict, agoq: dict | None, ga: int):
    from deepspeed.pipe import PipelineModule

    from agoq_ds.testing.models import build_llama, causal_lm_loss, llama_pipeline_layers

    model = build_llama("tiny", seed=0)
    pipe = PipelineModule(
        layers=llama_pipeline_layers(model), num_stages=2, loss_fn=causal_lm_loss, partition_method="uniform"
    )
    return make_engine(pipe, ds_config(route, ga=ga, agoq=agoq, micro=2, lr=2e-3, clip=1.0))


def _pipeline_data(engine, skip: int = 0):
    from agoq_ds.testing.data import batches, load_bytes, split

    train, _ = split(load_bytes(max_bytes=200_000))
    dp_rank = engine.grid.get_data_parallel_rank()
    dp_world = engine.grid.get_data_parallel_world_size()
    stream = itertools.islice(batches(train, 2, 32, seed=0, rank=dp_rank, world_size=dp_world), skip, None)
    return ((b, b) for b in stream)


def _pipeline_run(route: dict, agoq: dict | None, steps: int, ga: int) -> dict[str, Any]:
    engine = _pipeline_engine(route, agoq, ga)
    data = _pipeline_data(engine)
    losses = [float(engine.train_batch(data_iter=data)) for _ in range(steps)]
    stats = engine.agoq_stats() if hasattr(engine, "agoq_stats") else {}
    return {
        "engine": type(engine).__name__,
        "optimizer": type(engine.optimizer).__name__,
        "stage": engine.stage_id,
        "dp_rank": engine.grid.get_data_parallel_rank(),
        "losses": losses,
        "stats": {k: v for k, v in stats.items() if k.startswith("gradient/")},
        "params": _digest(list(engine.module.parameters())),
    }


def _pipeline_resume(route: dict, directory: str, ga: int) -> dict[str, Any]:
    agoq = {"error_feedback": True}
    engine = _pipeline_engine(route, agoq, ga)
    data = _pipeline_data(engine)
    for _ in range(2):
        engine.train_batch(data_iter=data)
    engine.save_checkpoint(directory, tag="p2")
    uninterrupted = [float(engine.train_batch(data_iter=data)) for _ in range(2)]
    resumed_engine = _pipeline_engine(route, agoq, ga)
    resumed_engine.load_checkpoint(directory, tag="p2")
    data = _pipeline_data(resumed_engine, skip=2 * ga)
    resumed = [float(resumed_engine.train_batch(data_iter=data)) for _ in range(2)]
    return {"uninterrupted": uninterrupted, "resumed": resumed}


def world4_pipeline(rank: int, world: int, directory: str, steps: int) -> dict[str, Any]:
    """Every pipeline route, stock versus agoq, and a checkpoint resume of the bf16 ZeRO-0 pipeline."""
    ga = 4
    runs = {
        name: {"stock": _pipeline_run(route, None, steps, ga), "agoq": _pipeline_run(route, {}, steps, ga)}
        for name, route in PIPE_ROUTES.items()
    }
    resume = _pipeline_resume(PIPE_ROUTES["s0_bf16"], os.path.join(directory, "pipe"), ga)
    return {"runs": runs, "resume": resume}
