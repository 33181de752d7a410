"""Scenarios that run on real gloo ranks for test_grad_distributed.py (top level, so spawn can
pickle them). Each returns plain numbers; the assertions live in the test module."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
from typing import Any

import torch
from torch import nn

G = 128
"""Group size used throughout."""


# --- shared helpers ----------------------------------------------------------------------------


def _quiet() -> None:
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def rank_data(n: int, seed: int, rank: int) -> torch.Tensor:
    """Correlated per-rank gradients: a shared heavy-tailed component plus rank-specific noise."""
    shared = torch.Generator().manual_seed(seed)
    profile = torch.exp(0.5 * torch.randn(n, generator=shared))
    common = torch.randn(n, generator=shared) * profile
    own = torch.Generator().manual_seed(seed * 1000 + rank + 1)
    return common + 0.3 * torch.randn(n, generator=own) * profile


def random_owner_map(n: int, world: int, seed: int) -> list[list[tuple[int, int]]]:
    """Odd-sized contiguous pieces of ``[0, n)`` dealt to ranks; for 3+ ranks the last gets none."""
    gen = torch.Generator().manual_seed(seed)
    owners = list(range(world - 1)) if world > 2 else list(range(world))
    out: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    start = 0
    while start < n:
        size = min(int(torch.randint(1, 300, (1,), generator=gen)), n - start)
        dest = owners[int(torch.randint(0, len(owners), (1,), generator=gen))]
        out[dest].append((start, size))
        start += size
    return out


def _segment(x: torch.Tensor, slices: list[tuple[int, int]]) -> torch.Tensor:
    from agoq_ds.gradient.collectives import gather_slices

    return gather_slices(x, slices)


def _expanded_bound(x: torch.Tensor) -> torch.Tensor:
    from agoq_ds.quant import bound, quantize

    if x.numel() == 0:
        return x.new_zeros(0, dtype=torch.float64)
    return bound(quantize(x, 8, G)).double().repeat_interleave(G)[: x.numel()]


def naive_int8_sum(x: torch.Tensor, owner_map: list[list[tuple[int, int]]], rank: int) -> torch.Tensor:
    """The naive scheme: per-group scale shared by all ranks, int8 codes summed as int8 (gloo wraps)."""
    from deepspeed import comm as dist

    segments = [_segment(x, s).float() for s in owner_map]
    absmax = []
    for seg in segments:
        pad = -seg.numel() % G
        absmax.append(torch.nn.functional.pad(seg.abs(), (0, pad)).view(-1, G).amax(dim=1) if seg.numel() else seg)
    flat_max = torch.cat(absmax)
    dist.all_reduce(flat_max, op=dist.ReduceOp.MAX)
    scales, codes, offset = [], [], 0
    for seg, m in zip(segments, absmax, strict=True):
        s = (flat_max[offset : offset + m.numel()] / 127).clamp_min(1e-30).repeat_interleave(G)[: seg.numel()]
        offset += m.numel()
        scales.append(s)
        codes.append(torch.round(seg / s).clamp(-127, 127).to(torch.int8))
    summed = torch.cat(codes)
    dist.all_reduce(summed)
    start = sum(seg.numel() for seg in segments[:rank])
    mine = summed[start : start + segments[rank].numel()]
    return mine.float() * scales[rank]


# --- collectives (a, b) ------------------------------------------------------------------------


def collective_checks(rank: int, world: int) -> dict[str, Any]:
    """8-bit reduce-scatter versus fp32 (fp64) reference, analytic bound and naive int8 sum."""
    from deepspeed import comm as dist

    from agoq_ds.gradient.collectives import (
        CommCounter,
        all_reduce_8bit,
        even_owner_map,
        exchange_bytes,
        packed_segment_bytes,
        reduce_scatter_8bit,
        relative_error,
    )

    out: dict[str, Any] = {}
    cases = [("main", 40_000, 0, torch.float32), ("bf16", 9_999, 1, torch.bfloat16), ("one", 1, 2, torch.float32)]
    cases.append(("empty", 0, 3, torch.float32))
    for name, n, seed, dtype in cases:
        owner_map = random_owner_map(n, world, seed)
        x = rank_data(n, seed, rank).to(dtype)
        counter = CommCounter()
        res = reduce_scatter_8bit(x, owner_map, group_size=G, counter=counter)
        total = x.double()
        dist.all_reduce(total)
        ref = _segment(total, owner_map[rank])
        bounds = torch.cat([_expanded_bound(_segment(x, s).float()) for s in owner_map])
        abs_sum = torch.cat([_segment(x, s).double().abs() for s in owner_map])
        dist.all_reduce(bounds)
        dist.all_reduce(abs_sum)
        start = sum(sum(m for _, m in s) for s in owner_map[:rank])
        mine = ref.numel()
        bound = bounds[start : start + mine] + abs_sum[start : start + mine] * 2.0**-20
        err = (res.values.double() - ref).abs()
        naive = naive_int8_sum(x, owner_map, rank)
        lengths = [sum(m for _, m in s) for s in owner_map]
        out[name] = {
            "numel": n,
            "mine": mine,
            "shape_ok": res.values.shape == (mine,) and res.values.dtype == torch.float32,
            "max_err_over_bound": float((err / bound).max()) if mine else 0.0,
            "rel": relative_error(res.values, ref) if mine else 0.0,
            "naive_rel": relative_error(naive, ref) if mine else 0.0,
            "sent": res.sent_bytes,
            "expected_sent": sum(packed_segment_bytes(m, G) for d, m in enumerate(lengths) if d != rank),
            "counted": counter.sent_bytes,
            "fp32_ring": 2 * (world - 1) / world * n * 4,
        }

    out["rounds"] = round_checks(rank, world)

    # The point-to-point exchange gloo uses and all_to_all_single deliver the same bytes, with
    # uneven and empty splits (rank r sends r + d + 1 bytes to d, none to itself or to rank 1).
    send_splits = [0 if d in (rank, 1) else rank + d + 1 for d in range(world)]
    recv_splits = [0 if rank in (s, 1) else s + rank + 1 for s in range(world)]
    send = torch.cat([torch.full((n,), 16 * rank + d, dtype=torch.uint8) for d, n in enumerate(send_splits)])
    by_p2p = torch.full((sum(recv_splits),), 255, dtype=torch.uint8)
    by_a2a = by_p2p.clone()
    exchange_bytes(by_p2p, send, recv_splits, send_splits, point_to_point=True)
    exchange_bytes(by_a2a, send, recv_splits, send_splits, point_to_point=False)
    expected = torch.cat([torch.full((n,), 16 * src + rank, dtype=torch.uint8) for src, n in enumerate(recv_splits)])
    out["exchange"] = {"p2p_ok": torch.equal(by_p2p, expected), "a2a_ok": torch.equal(by_a2a, expected)}

    y = rank_data(12_345, 7, rank)
    full = all_reduce_8bit(y, group_size=G)
    ref = y.double()
    dist.all_reduce(ref)
    owner = even_owner_map(y.numel(), world)
    rs_bound = torch.cat([_expanded_bound(_segment(y, s)) for s in owner])
    dist.all_reduce(rs_bound)
    final_bound = _expanded_bound(ref.float())
    bound = rs_bound + final_bound * 1.01 + rs_bound.max() / 100 + ref.abs() * 2.0**-20
    gathered = [torch.empty_like(full) for _ in range(world)]
    dist.all_gather(gathered, full)
    out["all_reduce"] = {
        "max_err_over_bound": float(((full.double() - ref).abs() / bound).max()),
        "rel": relative_error(full, ref),
        "identical_on_all_ranks": all(torch.equal(g, full) for g in gathered),
    }
    return out


def round_checks(rank: int, world: int) -> dict[str, Any]:
    """Shares larger than ``collectives.ROUND_ELEMENTS`` (set to ``3 G`` here) go in several exchange
    rounds: round to nearest gives the single exchange's result bit for bit (the quantization groups
    are the same), the bytes are the rounds' packed segments, and no packed buffer exceeds a round."""
    from agoq_ds.gradient import collectives

    n, seed = 40_000, 5
    owner_map = random_owner_map(n, world, seed)
    lengths = [sum(m for _, m in s) for s in owner_map]
    x = rank_data(n, seed, rank).to(torch.bfloat16)
    whole = collectives.reduce_scatter_8bit(x, owner_map, group_size=G, scale=0.5)
    saved_round, saved_exchange = collectives.ROUND_ELEMENTS, collectives.exchange_bytes
    exchanges: list[int] = []

    def counted(recv, send, *args, **kwargs):
        exchanges.append(max(recv.numel(), send.numel()))
        return saved_exchange(recv, send, *args, **kwargs)

    collectives.ROUND_ELEMENTS, collectives.exchange_bytes = 3 * G, counted
    try:
        rounds = collectives.reduce_scatter_8bit(x, owner_map, group_size=G, scale=0.5)
    finally:
        collectives.ROUND_ELEMENTS, collectives.exchange_bytes = saved_round, saved_exchange
    step = 3 * G
    expected_sent = sum(
        collectives.packed_segment_bytes(min(m - start, step), G)
        for d, m in enumerate(lengths)
        if d != rank
        for start in range(0, m, step)
    )
    return {
        "identical": torch.equal(whole.values, rounds.values) and torch.equal(whole.group_bound, rounds.group_bound),
        "exchanges": len(exchanges),
        "expected_exchanges": -(-max(lengths) // step),
        "largest_buffer": max(exchanges),
        "round_limit": (world - 1) * collectives.packed_segment_bytes(step, G),
        "sent": rounds.sent_bytes,
        "expected_sent": expected_sent,
    }


# --- DeepSpeed engines -------------------------------------------------------------------------


def small_mlp(seed: int = 0) -> nn.Module:
    """277 parameters in odd sizes, one weight (130) larger than the test bucket."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 10), nn.Tanh(), nn.Linear(10, 3))


def ds_config(stage: int, ga: int = 1, bf16: bool = False, micro: int = 4, lr: float = 1e-2, **zero: Any) -> dict:
    """A ZeRO config with a torch AdamW (DeepSpeed's fused Adam does not build on CPU)."""
    zero_cfg = {"stage": stage, "reduce_bucket_size": 60, "contiguous_gradients": True, "overlap_comm": False}
    zero_cfg.update(zero)
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": ga,
        "steps_per_print": 10**9,
        "zero_optimization": zero_cfg,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "torch_adam": True}},
        "bf16": bf16 if isinstance(bf16, dict) else {"enabled": bf16},
    }


PINNED_GRADIENT = {"rounding": "nearest", "error_feedback": True, "min_numel": 0}
"""Gradient settings these workers assume unless a case overrides them (``min_numel`` 0: the test
model's 277 parameters would otherwise all travel and rest in fp32)."""

SHIPPED_GRADIENT = {"rounding": "stochastic", "error_feedback": False, "min_numel": 1024}
"""The defaults of ``GradientConfig`` as shipped (a test checks they still are)."""


def make_engine(model: nn.Module, config: dict, agoq: dict | None, two_groups: bool = False):
    """``deepspeed.initialize`` — with the agoq optimizer swapped in when ``agoq`` is a dict.

    ``two_groups`` gives the optimizer two param groups (weights, then biases), as HF Trainer does.
    """
    import deepspeed

    from agoq_ds.config import parse_agoq_config
    from agoq_ds.deepspeed.install import agoq_zero_optimizer

    _quiet()
    params: Any = model.parameters()
    if two_groups:
        weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in model.named_parameters() if not n.endswith("weight")]
        params = [{"params": weights, "weight_decay": 0.1}, {"params": biases, "weight_decay": 0.0}]
    if agoq is not None:
        # These tests were written against round-to-nearest with error feedback; cases that want the
        # shipped defaults (stochastic rounding, no error feedback) say so in their gradient block.
        agoq = {**agoq, "gradient": {**PINNED_GRADIENT, **agoq.get("gradient", {})}}
    ctx = agoq_zero_optimizer(parse_agoq_config(agoq)) if agoq is not None else contextlib.nullcontext()
    with ctx:
        engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=params)
    return engine


def _mlp_batch(gen: torch.Generator, micro: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(micro, 7, generator=gen), torch.randn(micro, 3, generator=gen)


def _flat_group_layout(opt, group: int = 0) -> tuple[list[int], list[int], int]:
    """Start offset in the flat group of each of its params (``bit16_groups`` order), numels, length."""
    params = opt.round_robin_bit16_groups[group]
    offsets = dict(zip([id(p) for p in params], opt.round_robin_bit16_offsets[group], strict=True))
    members = opt.bit16_groups[group]
    return [offsets[id(p)] for p in members], [p.numel() for p in members], opt.bit16_groups_flat[group].numel()


def _to_flat_group(opt, grad_by_param: dict[int, torch.Tensor], group: int = 0) -> torch.Tensor:
    starts, numels, length = _flat_group_layout(opt, group)
    flat = torch.zeros(length, dtype=torch.float64)
    for p, s, n in zip(opt.bit16_groups[group], starts, numels, strict=True):
        flat[s : s + n] = grad_by_param[id(p)].reshape(-1).double()
    return flat


def _partition(opt, flat: torch.Tensor, rank: int, group: int = 0) -> torch.Tensor:
    size = int(opt.partition_size[group])
    return flat[rank * size : (rank + 1) * size]


def _agoq_partition(opt, group: int = 0) -> torch.Tensor:
    grads = opt.averaged_gradients[group]
    flat = getattr(grads, "flat_partition", None)
    return flat.double().clone() if flat is not None else torch.cat([g.reshape(-1).double() for g in grads])


def _run_with_reference(
    rank: int, world: int, stage: int, ga: int, agoq: dict | None, steps: int, two_groups: bool = False, **zero: Any
):
    """Train the MLP; at each boundary, before ``step()``, yield the engine and per param group the
    partition from the optimizer and the per-micro-step fp32 local grads of every rank (flat-group
    order, ``[rank, micro, element]``)."""
    from deepspeed import comm as dist

    model = small_mlp()
    reference = copy.deepcopy(model)
    engine = make_engine(model, ds_config(stage, ga=ga, **zero), agoq, two_groups=two_groups)
    opt = engine.optimizer
    engine_params = list(engine.module.parameters())
    groups = range(len(opt.bit16_groups))
    gen = torch.Generator().manual_seed(1000 + rank)
    loss_fn = nn.MSELoss()
    for _ in range(steps):
        reference.load_state_dict(engine.module.state_dict())
        local: list[list[torch.Tensor]] = [[] for _ in groups]
        for micro in range(ga):
            x, y = _mlp_batch(gen)
            engine.backward(loss_fn(engine(x), y))
            grads = torch.autograd.grad(loss_fn(reference(x), y) / ga, list(reference.parameters()))
            by_param = {id(p): g for p, g in zip(engine_params, grads, strict=True)}
            for i in groups:
                local[i].append(_to_flat_group(opt, by_param, i))
            if micro < ga - 1:
                engine.step()
        got, every = [], []
        for i in groups:
            every_rank = torch.zeros(world, ga, local[i][0].numel(), dtype=torch.float64)
            every_rank[rank] = torch.stack(local[i])
            dist.all_reduce(every_rank)
            got.append(_agoq_partition(opt, i))
            every.append(every_rank)
        yield engine, got, every
        engine.step()


def straddle_checks(rank: int, world: int) -> dict[str, Any]:
    """ZeRO-1/2 partitions with params straddling ranks, last-rank padding, several buckets, one
    oversized param, every reduction path; versus the fp32 reference (and stock DeepSpeed)."""
    cases = {
        "s2": (2, {}, {}),
        "s2_noncontig": (2, {}, {"contiguous_gradients": False}),
        "s2_overlap": (2, {}, {"overlap_comm": True}),
        "s2_allreduce": (2, {}, {"reduce_scatter": False}),
        "s2_aligned": (2, {}, {"parameter_alignment": True}),
        "s2_round_robin": (2, {}, {"round_robin_gradients": True}),
        "s2_two_groups": (2, {}, {"two_groups": True}),
        "s2_fp32_storage": (2, {"gradient": {"storage_bits": 32}}, {}),
        "s2_fp32_comm": (2, {"gradient": {"communication_bits": 32}}, {}),
        "s2_shipped_defaults": (2, {"gradient": dict(SHIPPED_GRADIENT)}, {}),
        "s1_shipped_defaults": (1, {"gradient": dict(SHIPPED_GRADIENT)}, {}),
        "s1": (1, {}, {}),
        "s1_noncontig_overlap": (1, {}, {"contiguous_gradients": False, "overlap_comm": True}),
        "s1_allreduce": (1, {}, {"reduce_scatter": False}),
        "s1_two_groups": (1, {}, {"two_groups": True}),
        "stock_s2": (2, None, {}),
        "stock_s1": (1, None, {"two_groups": True}),
    }
    out = {}
    for name, (stage, agoq, zero) in cases.items():
        rows = []
        for engine, got, every in _run_with_reference(rank, world, stage, 2, agoq, steps=2, **zero):
            opt = engine.optimizer
            for i, (got_i, every_rank) in enumerate(zip(got, every, strict=True)):
                exact = _partition(opt, every_rank.sum(dim=(0, 1)) / world, rank, i)
                starts, numels, _ = _flat_group_layout(opt, i)
                covered = torch.zeros(every_rank.shape[-1], dtype=torch.bool)
                for s, n in zip(starts, numels, strict=True):
                    covered[s : s + n] = True
                holes = ~_partition(opt, covered, rank, i)
                rows.append(
                    {
                        "group": i,
                        "rel": float((got_i - exact).norm() / exact.norm()),
                        "max_err_over_absmax": float((got_i - exact).abs().max() / exact.abs().max()),
                        "holes": int(holes.sum()),
                        "holes_zero": bool(torch.all(got_i[holes] == 0)),
                    }
                )
        out[name] = {"rows": rows, "optimizer": type(engine.optimizer).__name__, "stats": _stats(engine)}
        if name == "s2":
            from agoq_ds.config import AgoqConfig
            from agoq_ds.deepspeed.unsupported import check_supported

            check_supported(engine, AgoqConfig())  # the engine form of the check accepts what was built
    return out


def _stats(engine) -> dict[str, float]:
    fn = getattr(engine.optimizer, "agoq_stats", None)
    return fn() if callable(fn) else {}


# --- accumulation (d) --------------------------------------------------------------------------


def _group_absmax(x: torch.Tensor, starts: list[int], numels: list[int]) -> torch.Tensor:
    """Per-element absmax of its quantization group, groups of G aligned at each segment start."""
    out = torch.zeros_like(x)
    for s, n in zip(starts, numels, strict=True):
        seg = x[s : s + n].abs()
        pad = -n % G
        m = torch.nn.functional.pad(seg, (0, pad)).view(-1, G).amax(dim=1).repeat_interleave(G)[:n]
        out[s : s + n] = m
    return out


def _partition_max(x: torch.Tensor, world: int, size: int) -> torch.Tensor:
    return torch.stack([x[r * size : (r + 1) * size].abs().max() for r in range(world)])


def accumulation_checks(rank: int, world: int) -> dict[str, Any]:
    """Accumulated gradient after K = 1, 8, 32 micro-batches versus fp32 accumulation, against the
    bound derived in test_grad_distributed.py."""
    out = {}
    for stage in (1, 2):
        for k in (1, 8, 32):
            gen = _run_with_reference(rank, world, stage, k, {}, steps=1)
            engine, got_groups, every_groups = next(gen)
            got, every_rank = got_groups[0], every_groups[0]
            opt = engine.optimizer
            size = int(opt.partition_size[0])
            exact_full = every_rank.sum(dim=(0, 1)) / world
            exact = _partition(opt, exact_full, rank)
            bound = _accumulation_bound(opt, every_rank, world, stage, size)
            bound = _partition(opt, bound, rank) + exact.abs() * 2.0**-18 + 1e-12
            err = (got - exact).abs()
            out[f"s{stage}_k{k}"] = {
                "max_err_over_bound": float((err / bound).max()),
                "rel": float(err.norm() / exact.norm()),
                "rel_bound": float(bound.norm() / exact.norm()),
            }
            with contextlib.suppress(StopIteration):
                next(gen)
    return out


def _accumulation_bound(opt, every_rank: torch.Tensor, world: int, stage: int, size: int) -> torch.Tensor:
    """Per-element bound (flat-group coordinates) of |8-bit accumulated - fp32 accumulated|."""
    n_ranks, k, length = every_rank.shape
    starts, numels, _ = _flat_group_layout(opt)
    half_step = 1.0 / 254 * (1 + 2.0**-18)
    if stage == 2:
        # comm, per micro-step: each sender's group absmax <= its max over the owner's partition.
        comm = torch.zeros(length, dtype=torch.float64)
        for j in range(k):
            per_owner = sum(_partition_max(every_rank[r, j], world, size) for r in range(n_ranks)) * half_step / world
            comm += per_owner.repeat_interleave(size)[:length]
        # storage: error feedback over K requantizations of partition groups (aligned to partition).
        partition_starts = [r * size for r in range(world)]
        sums = torch.cumsum(every_rank.sum(dim=0), dim=0) / world
        cum_comm = comm  # the comm error of all micro-steps bounds the one of any prefix
        m = torch.stack([_group_absmax(s, partition_starts, [size] * world) for s in sums]).amax(dim=0) + cum_comm
        m = m * (1 + k / 60000)
        storage = m * half_step * (1 + (k - 1) / 254)
        return comm + storage
    # stage 1: per-rank int8 accumulators per param over K-1 folds, then one 8-bit reduction.
    store = torch.zeros(n_ranks, length, dtype=torch.float64)
    if k > 1:
        for r in range(n_ranks):
            sums = torch.cumsum(every_rank[r, : k - 1], dim=0)
            m = torch.stack([_group_absmax(s, starts, numels) for s in sums]).amax(dim=0) * (1 + k / 60000)
            store[r] = m * half_step * (1 + (k - 2) / 254)
    totals = every_rank.sum(dim=1).abs() + store
    comm = sum(_partition_max(totals[r], world, size) for r in range(n_ranks)) * half_step / world
    return store.sum(dim=0) / world + comm.repeat_interleave(size)[:length]


# --- overflow (e) ------------------------------------------------------------------------------


def _overflow_run(rank: int, stage: int, bf16: Any, agoq: dict | None, value: float, **zero: Any) -> dict[str, Any]:
    model = small_mlp()
    engine = make_engine(model, ds_config(stage, ga=2, bf16=bf16, **zero), agoq)
    weight = engine.module[0].weight
    inject = {"on": False}

    def hook(grad: torch.Tensor) -> torch.Tensor:
        if inject["on"] and rank == 0:
            grad = grad.clone()
            grad[3, 2] = value
        return grad

    weight.register_hook(hook)
    gen = torch.Generator().manual_seed(7 + rank)
    rows = []
    for step in range(4):
        for micro in range(2):
            inject["on"] = step == 1 and micro == 0
            x, y = _mlp_batch(gen)
            dtype = next(engine.module.parameters()).dtype
            loss = nn.functional.mse_loss(engine(x.to(dtype)), y.to(dtype))
            engine.backward(loss)
            engine.step()
        norm = engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        rows.append(
            {
                "loss": float(loss),
                "overflow": bool(engine.optimizer.overflow),
                "norm_finite": math.isfinite(norm) and norm >= 0,
                "params_finite": all(bool(torch.isfinite(p).all()) for p in engine.module.parameters()),
            }
        )
    return {"rows": rows, "skipped": int(engine.skipped_steps)}


def assert_overflow_like_stock(ranks: list[dict], case: str) -> None:
    """Every rank's overflow run of ``case`` (``_overflow_run``, stock and agoq) skipped exactly one step,
    as stock did, with the same overflow, norm and parameter flags at every step."""
    for rank, result in enumerate(ranks):
        stock, agoq = result["overflow"][case]["stock"], result["overflow"][case]["agoq"]
        assert agoq["skipped"] == stock["skipped"] == 1, (rank, stock, agoq)
        for s, a in zip(stock["rows"], agoq["rows"], strict=True):
            for key in ("overflow", "norm_finite", "params_finite"):
                assert s[key] == a[key], (rank, key, stock, agoq)


def overflow_checks(rank: int, world: int) -> dict[str, Any]:
    """Inf/NaN injected on rank 0 in step 1: the same outcome as stock DeepSpeed."""
    out = {}
    cases = {
        "s2_fp32_inf": (2, False, float("inf")),
        "s2_bf16_inf": (2, True, float("inf")),
        "s1_bf16_nan": (1, True, float("nan")),
        "s1_fp32_inf": (1, False, float("inf")),
        "s2_bf16_nocheck_inf": (2, {"enabled": True, "check_grad_overflow": False}, float("inf")),
    }
    for name, (stage, bf16, value) in cases.items():
        out[name] = {
            "stock": _overflow_run(rank, stage, bf16, None, value),
            "agoq": _overflow_run(rank, stage, bf16, {}, value),
        }
    return out


# --- checkpoint (f) ----------------------------------------------------------------------------


def _train_steps(engine, gen: torch.Generator, steps: int, ga: int) -> list[float]:
    losses = []
    for _ in range(steps):
        for _ in range(ga):
            x, y = _mlp_batch(gen)
            loss = nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
        losses.append(loss.item())
    return losses


def _residuals(engine) -> dict[str, torch.Tensor]:
    from agoq_ds.gradient.store import STATE_KEY

    state = engine.optimizer.state_dict()[STATE_KEY]
    out = {}
    for kind in ("per_step_residuals", "carried_residuals"):
        for key, value in state[kind].items():
            if value is not None:
                out[f"{kind}/{key}/codes"] = value["codes"]
                out[f"{kind}/{key}/scales"] = value["scales"]
    return out


def _plain(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, int | str) and _plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, torch.Tensor | int | float | str | bool)


def checkpoint_checks(rank: int, world: int, directory: str) -> dict[str, Any]:
    """Save with error-feedback state, resume, compare with the uninterrupted run; stock<->agoq."""
    from deepspeed import comm as dist

    from agoq_ds.gradient.store import STATE_KEY

    out = {}
    ga = 3
    for stage in (1, 2):
        path = os.path.join(directory, f"stage{stage}")
        engine = make_engine(small_mlp(), ds_config(stage, ga=ga), {})
        gen = torch.Generator().manual_seed(50 + rank)
        _train_steps(engine, gen, 3, ga)
        engine.save_checkpoint(path, tag="t3")
        saved = _residuals(engine)
        state = gen.get_state()
        uninterrupted = _train_steps(engine, gen, 3, ga)

        resumed_engine = make_engine(small_mlp(seed=1), ds_config(stage, ga=ga), {})
        resumed_engine.load_checkpoint(path, tag="t3")
        loaded = _residuals(resumed_engine)
        gen.set_state(state)
        resumed = _train_steps(resumed_engine, gen, 3, ga)

        without_ef = make_engine(small_mlp(seed=1), ds_config(stage, ga=ga), {})
        without_ef.load_checkpoint(path, tag="t3")
        for acc in without_ef.optimizer.agoq_store.accumulators():
            acc.reset_residual()
        gen.set_state(state)
        resumed_without_ef = _train_steps(without_ef, gen, 3, ga)

        stock = make_engine(small_mlp(seed=1), ds_config(stage, ga=ga), None)
        stock.load_checkpoint(path, tag="t3")
        gen.set_state(state)
        stock_losses = _train_steps(stock, gen, 1, ga)
        stock_path = os.path.join(directory, f"stock{stage}")
        stock.save_checkpoint(stock_path, tag="s")
        from_stock = make_engine(small_mlp(seed=1), ds_config(stage, ga=ga), {})
        from_stock.load_checkpoint(stock_path, tag="s")
        zero_residual = all(int(torch.count_nonzero(v)) == 0 for v in _residuals(from_stock).values())

        entry = engine.optimizer.state_dict()[STATE_KEY]
        buf = io.BytesIO()
        torch.save(entry, buf)
        buf.seek(0)
        reloaded = torch.load(buf, weights_only=True)
        dist.barrier()
        out[f"s{stage}"] = {
            "residual_nonzero": any(int(torch.count_nonzero(v)) > 0 for v in saved.values()),
            "residual_restored": saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved),
            "uninterrupted": uninterrupted,
            "resumed": resumed,
            "resumed_without_ef": resumed_without_ef,
            "stock_loads_agoq": math.isfinite(stock_losses[0]),
            "agoq_loads_stock_zero_residual": zero_residual,
            "plain_state": _plain(entry),
            "weights_only_ok": reloaded.keys() == entry.keys(),
        }
    return out


# --- training parity with LLaMA (g) and bytes (c) ----------------------------------------------


def _count_stock_allreduce(counter: dict[str, float], world: int):
    """Wrap ``deepspeed.comm.all_reduce`` to count the ring bytes of gradient-sized all-reduces."""
    from deepspeed import comm as dist

    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        if tensor.numel() > 16:
            counter["bytes"] += 2 * (world - 1) / world * tensor.numel() * tensor.element_size()
        return original(tensor, *args, **kwargs)

    return original, counting


def train_llama(
    rank: int, world: int, stage: int, bf16: bool, agoq: dict | None, steps: int, ga: int = 2
) -> dict[str, Any]:
    """Train ``build_llama("tiny")`` on the embedded corpus; global mean loss per step."""
    from deepspeed import comm as dist

    from agoq_ds.testing.data import batches, load_bytes, split
    from agoq_ds.testing.models import build_llama

    model = build_llama("tiny", seed=0)
    initial = [p.detach().clone() for p in model.parameters()]
    config = ds_config(stage, ga=ga, bf16=bf16, micro=2, lr=2e-3, reduce_bucket_size=200_000)
    config["gradient_clipping"] = 1.0
    engine = make_engine(model, config, agoq)
    train, _ = split(load_bytes(max_bytes=400_000))
    data = batches(train, 2, 64, seed=0, rank=rank, world_size=world)
    counter = {"bytes": 0.0}
    original, counting = _count_stock_allreduce(counter, world)
    losses = []
    for _ in range(steps):
        total = torch.zeros(1, dtype=torch.float64)
        for _ in range(ga):
            tokens = next(data)
            loss = engine(input_ids=tokens, labels=tokens).loss
            dist.all_reduce = counting
            try:
                engine.backward(loss)
            finally:
                dist.all_reduce = original
            engine.step()
            total += float(loss)
        dist.all_reduce(total)
        losses.append(float(total) / (ga * world))
    moved = [
        float((p.detach().float() - q.float()).norm() / (q.float().norm() + 1e-12))
        for p, q in zip(engine.module.parameters(), initial, strict=True)
    ]
    return {"losses": losses, "allreduce_bytes": counter["bytes"], "stats": _stats(engine), "moved_min": min(moved)}


def parity_checks(rank: int, world: int, steps: int) -> dict[str, Any]:
    """Stock DeepSpeed versus 8-bit gradients, ZeRO-1/2, bf16/fp32, same seed and data."""
    out = {}
    for stage in (1, 2):
        for bf16 in (True, False):
            name = f"s{stage}_{'bf16' if bf16 else 'fp32'}"
            out[name] = {
                "stock": train_llama(rank, world, stage, bf16, None, steps),
                "agoq": train_llama(rank, world, stage, bf16, {}, steps),
            }
        out[f"s{stage}_bf16_shipped"] = {
            "stock": out[f"s{stage}_bf16"]["stock"],
            "agoq": train_llama(rank, world, stage, True, {"gradient": SHIPPED_GRADIENT}, steps),
        }
    return out


# --- entry points per world size -----------------------------------------------------------------


def world2(rank: int, world: int, directory: str, parity_steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "collectives": collective_checks(rank, world),
        "accumulation": accumulation_checks(rank, world),
        "overflow": overflow_checks(rank, world),
        "checkpoint": checkpoint_checks(rank, world, directory),
        "parity": parity_checks(rank, world, parity_steps),
    }


def world3(rank: int, world: int) -> dict[str, Any]:
    return {"collectives": collective_checks(rank, world), "straddle": straddle_checks(rank, world)}


def world4(rank: int, world: int) -> dict[str, Any]:
    return {"collectives": collective_checks(rank, world)}


def rounding_bias(rank: int, world: int, draws: int, stochastic: bool) -> dict[str, float]:
    """Mean over ``draws`` seeds of the 8-bit reduce-scatter's error, in units of the sender's
    quantization step: per element, the largest ``|mean error| / (step / (2 sqrt(draws)))``.

    With stochastic rounding each draw's error of an element is unbiased with standard deviation at
    most ``step / 2``, so the mean of ``draws`` errors has standard deviation at most
    ``step / (2 sqrt(draws))``: the statistic stays near a few units. Round-to-nearest repeats one
    error of up to ``step / 2`` every draw: the statistic grows like ``sqrt(draws)``.
    """
    from agoq_ds.gradient.collectives import even_owner_map, reduce_scatter_8bit
    from agoq_ds.quant import quantize

    n, seed = 8 * G, 11
    owner_map = even_owner_map(n, world)
    mine = _segment(rank_data(n, seed, rank), owner_map[rank]).double()
    others = [_segment(rank_data(n, seed, r), owner_map[rank]) for r in range(world) if r != rank]
    exact = mine + sum(o.double() for o in others)
    x = rank_data(n, seed, rank)
    total = torch.zeros_like(exact)
    for draw in range(draws):
        total += reduce_scatter_8bit(x, owner_map, group_size=G, stochastic=stochastic, seed=draw).values.double()
    mean_error = total / draws - exact
    # One sender (two ranks): the step of each element is its group's scale on that sender.
    steps = quantize(others[0], 8, G).scales.double().repeat_interleave(G)[: exact.numel()]
    return {"max_z": float((mean_error.abs() / (steps / (2 * draws**0.5))).max())}


def small_gradient_checks(rank: int, world: int) -> dict[str, Any]:
    """Few-element reductions travel exactly (``exact_below``) while the 8-bit path rounds them, and an
    engine whose every gradient is below the default ``min_numel`` trains like stock."""
    from agoq_ds.gradient.collectives import all_reduce_8bit, even_owner_map, reduce_scatter_8bit

    _quiet()
    out: dict[str, Any] = {}
    x = rank_data(4, 11, rank)
    exact = sum(rank_data(4, 11, r) for r in range(world)) / world
    owner = even_owner_map(4, world)
    for label, below in (("exact", 1024), ("int8", 0)):
        full = all_reduce_8bit(x, scale=1 / world, exact_below=below)
        mine = reduce_scatter_8bit(x, owner, scale=1 / world, exact_below=below).values
        out[f"allreduce_{label}"] = float(((full - exact).abs() / exact.abs()).max())
        out[f"reduce_scatter_{label}"] = float(((mine - _segment(exact, owner[rank])).abs()).max())
    weights = {}
    for label, agoq in (("stock", None), ("agoq", {"gradient": dict(SHIPPED_GRADIENT)})):
        engine = make_engine(small_mlp(), ds_config(2, ga=2), agoq)
        gen = torch.Generator().manual_seed(5 + rank)
        for _ in range(2 * 2):
            inputs, targets = _mlp_batch(gen)
            loss = torch.nn.functional.mse_loss(engine(inputs), targets)
            engine.backward(loss)
            engine.step()
        weights[label] = torch.cat([p.detach().float().flatten() for p in engine.module.parameters()])
    out["engine_max_diff"] = float((weights["agoq"] - weights["stock"]).abs().max())
    initial = torch.cat([p.detach().flatten() for p in small_mlp().parameters()])
    out["engine_moved"] = float((weights["stock"] - initial).abs().max())
    return out


def single_rank_reduce(rank: int, world: int) -> dict[str, Any]:
    """``reduce_scatter_8bit`` on one rank: the values themselves, no fp32 copy of the bucket."""
    from agoq_ds.gradient.collectives import even_owner_map, reduce_scatter_8bit

    flat = torch.randn(1000, dtype=torch.bfloat16)
    owner = even_owner_map(1000, world)
    same = reduce_scatter_8bit(flat, owner).values
    halved = reduce_scatter_8bit(flat, owner, scale=0.5).values
    return {
        "view": same.data_ptr() == flat.data_ptr() and torch.equal(same, flat),
        "scaled": halved.dtype == torch.float32 and torch.equal(halved, flat.float() * 0.5),
    }
