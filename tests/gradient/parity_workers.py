"""The gradient parity suite's cases and the rank-side run (``test_gradient_parity.py`` asserts).

A case is one DeepSpeed configuration (gradient host, micro-batches, dtype, clipping, how backward is
called, ``gradient_allreduce_op``, ``agoq.gradient.min_numel``). Each case trains ``ParityNet`` for
``STEPS`` optimizer steps twice on the same data, stock and with ``"agoq"``, with plain SGD, and
before every step replays the step's micro-batches in fp64 (the bf16 cases in bf16, as the engine
computes them, summed in fp64) from the engine's own master weights. Each parameter's update is then
compared with ``-lr * clip_coef * reference_gradient`` against the bound of ``update_bound``.

``ParityNet`` holds a parameter of every kind the issue names: a 1-element scale, parameters below
and above ``min_numel`` (1024 elements by default), an odd-sized one that ZeRO splits unevenly
across partitions, a frozen layer, a parameter no micro-batch uses, one that only rank 0's first
micro-batch uses, and a weight used twice (shared). ``reduce_bucket_size`` is 700 elements, so the
ZeRO hosts reduce several buckets per backward, some below ``min_numel`` (exact) and some above.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any

import torch
from torch import nn

D_IN, D_HID, D_BIG, D_ODD, D_OUT = 16, 16, 96, 13, 16
MICRO = 4
"""Samples per micro-batch."""
LR = 1.0
"""SGD step size: the update is the (clipped) gradient itself."""
CLIP = 0.05
"""``gradient_clipping`` when a case clips: well below the gradient norm, so clipping is active."""
STEPS = 2
"""Optimizer steps per case; the second checks that nothing of the first leaks into it."""
BUCKET = 700
"""``reduce_bucket_size`` of the ZeRO hosts (elements)."""

AXES: dict[str, list[Any]] = {
    "host": ["s0", "bf16opt", "z1", "z2", "z3", "pipe", "pipe_dp2", "z1off", "z2off", "z3off", "z1offacc"],
    "micro": [1, 4],
    "dtype": ["fp32", "bf16"],
    "clip": [False, True],
    "backward": ["engine", "loss", "several"],
    "op": ["mean", "sum"],
    "min_numel": [1024, 0],
}
"""The case matrix: every combination DeepSpeed 0.19.8 supports (``valid``)."""

WORLD = {"pipe_dp2": 4}
"""Ranks per host (2 unless named): ``pipe`` is 2 stages x 1 data-parallel rank, ``pipe_dp2`` 2 x 2."""

OFFLOAD = {"z1off": 1, "z2off": 2, "z3off": 3, "z1offacc": 1}
"""The ZeRO-Offload hosts (``offload_optimizer: cpu``; at ZeRO-3 ``offload_param: cpu`` too, as in HF's
DeepSpeed guide) and their stage. ``z1offacc``: ZeRO-1 offload with bf16 and ``grad_accum_dtype`` fp32,
where DeepSpeed accumulates in ``param.grad_accum`` (``use_grad_accum_attribute``; without offload the
same settings build ``BF16_Optimizer``)."""


def valid(case: dict[str, Any]) -> bool:
    """Whether DeepSpeed 0.19.8 supports the combination (stock refuses the others itself)."""
    host, backward = case["host"], case["backward"]
    if host in ("bf16opt", "z1offacc") and case["dtype"] != "bf16":
        return False  # bf16 with fp32 accumulation
    if host.startswith("pipe") and backward != "engine":
        return False  # the pipeline engine runs its own backward (train_batch)
    if host == "s0" and backward == "loss":
        return False  # loss.backward() is refused at ZeRO stage 0
    if backward == "several" and host not in ("z1", "z2", "z3", *OFFLOAD):
        return False  # coalesce_grad_reduction: ZeRO 1/2/3 without BF16_Optimizer only
    if case["op"] == "sum" and host in ("z3", "z3off"):
        return False  # gradient_allreduce_op sum is refused at ZeRO-3
    return True


def all_cases() -> list[dict[str, Any]]:
    """Every valid combination of ``AXES``."""
    names = list(AXES)
    cases = [dict(zip(names, values, strict=True)) for values in itertools.product(*AXES.values())]
    return [c for c in cases if valid(c)]


TRIPLES = [("host", "dtype", "min_numel"), ("host", "micro", "min_numel"), ("host", "micro", "backward")]
"""Axis triples the CI subset covers whole: what takes the exact or the 8-bit path depends on all
three (the pipeline's zeroed sub-``min_numel`` gradients needed fp32, ``min_numel`` 1024 and a
pipeline or several micro-batches); how a host accumulates depends on the micro-batches and how
backward is called (``z1offacc`` lost its int8 folds only with several backward calls per step)."""


def _combinations(case: dict[str, Any]) -> set[tuple]:
    pairs = {((a, case[a]), (b, case[b])) for a, b in itertools.combinations(list(AXES), 2)}
    return pairs | {tuple((a, case[a]) for a in triple) for triple in TRIPLES}


def pairwise_cases() -> list[dict[str, Any]]:
    """A subset of ``all_cases`` in which every pair of axis values, and every ``TRIPLES`` triple, that
    occurs together in some valid case occurs together at least once (greedy; deterministic)."""
    cases = all_cases()
    missing = set().union(*(_combinations(c) for c in cases))
    chosen: list[dict[str, Any]] = []
    while missing:
        best = max(cases, key=lambda c: len(_combinations(c) & missing))
        chosen.append(best)
        missing -= _combinations(best)
    return chosen


def case_id(case: dict[str, Any]) -> str:
    """A readable test id."""
    clip = "clip" if case["clip"] else "noclip"
    parts = [case["host"], f"k{case['micro']}", case["dtype"], clip, case["backward"], case["op"]]
    return "-".join([*parts, f"min{case['min_numel']}"])


# --- the model ---------------------------------------------------------------------------------------


class Front(nn.Module):
    """Pipeline stage 0: a 1-element scale, a small layer, a frozen layer, a rarely used parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([0.9]))
        self.small = nn.Linear(D_IN, D_HID)  # 272 elements: below min_numel
        self.frozen = nn.Linear(D_HID, D_HID).requires_grad_(False)
        self.rare = nn.Parameter(torch.randn(D_HID) * 0.5)  # used by one micro-batch of one rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.small(x)) * self.scale
        h = h + self.frozen(h)
        if bool(x[0, -1] > 0):
            h = h + self.rare
        return h


class Back(nn.Module):
    """Pipeline stage 1: layers above min_numel, an odd-sized matrix, a shared weight, an unused one."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(D_HID, D_BIG)  # 1 632 elements
        self.odd = nn.Parameter(torch.randn(D_BIG, D_ODD) * 0.1)  # 1 248 elements
        self.shared = nn.Linear(D_ODD, D_OUT, bias=False)  # used twice
        self.unused = nn.Parameter(torch.randn(40))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(self.big(h)) @ self.odd
        out = self.shared(z)
        back = out @ self.shared.weight
        return torch.cat([out, back], dim=-1)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error (the pipeline's ``loss_fn``)."""
    return ((output.float() - target.float()) ** 2).mean()


class ParityNet(nn.Sequential):
    """``Front`` then ``Back``; ``forward(x, y)`` returns the loss (so ``loss.backward()`` works)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(Front(), Back())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return loss_fn(super().forward(x), y)


def batch(
    step: int, dp_rank: int, micro: int, dtype: torch.dtype, *, every_rank: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``micro`` of data-parallel rank ``dp_rank`` at ``step``; the last input column
    flags the micro-batches that use ``Front.rare``: rank 0's first, or every rank's first with
    ``every_rank`` (``shared_unused``: where stock DeepSpeed 0.19.8 itself cannot reduce a parameter
    unused on a single rank)."""
    gen = torch.Generator().manual_seed(1000 * step + 100 * dp_rank + micro)
    x = torch.randn(MICRO, D_IN, generator=gen)
    x[:, -1] = 1.0 if ((dp_rank == 0 or every_rank) and micro == 0) else -1.0
    y = torch.randn(MICRO, D_OUT + D_ODD, generator=gen)
    return x.to(dtype), y.to(dtype)


# --- configuration --------------------------------------------------------------------------------------


def ds_config(case: dict[str, Any], agoq: bool) -> dict[str, Any]:
    """The DeepSpeed config of ``case`` (stock, or with a gradient-only ``"agoq"`` block)."""
    host = case["host"]
    stage = {"s0": 0, "bf16opt": 1, "z1": 1, "z2": 2, "z3": 3, "pipe": 0, "pipe_dp2": 0, **OFFLOAD}[host]
    several = case["backward"] == "several"
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1 if several else case["micro"],
        "steps_per_print": 10**9,
        "optimizer": {"type": "SGD", "params": {"lr": LR}},
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": BUCKET, "allgather_bucket_size": BUCKET},
        "bf16": {"enabled": case["dtype"] == "bf16"},
        "gradient_clipping": CLIP if case["clip"] else 0.0,
        "gradient_allreduce_op": case["op"],
    }
    if host in OFFLOAD:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            cfg["zero_optimization"]["offload_param"] = {"device": "cpu"}
    if stage == 3:
        cfg["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=BUCKET)
    if host in ("bf16opt", "z1offacc"):
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if agoq:
        cfg["agoq"] = {
            "activation": {"enabled": False},  # only the gradient path differs from stock
            # The debug guard runs at every step: a false alarm fails the case.
            "gradient": {"min_numel": case["min_numel"], "check_steps": STEPS},
            "log_summary": False,
        }
    return cfg


def _engine(case: dict[str, Any], agoq: bool):
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.ERROR)
    model = ParityNet()
    if case["host"].startswith("pipe"):
        from deepspeed.pipe import PipelineModule

        model = PipelineModule(layers=list(model), num_stages=2, loss_fn=loss_fn, partition_method="uniform")
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, config=ds_config(case, agoq), model_parameters=params)
    return engine


# --- reference ------------------------------------------------------------------------------------------


def _master(engine) -> tuple[dict[str, torch.Tensor], bool]:
    """Every trainable parameter's full master weight by name (fp32 where DeepSpeed keeps one that
    the tensor-fragment API reaches), and whether one was bf16 (the module's own weight)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out, low = {}, False
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        full = safe_get_full_fp32_param(param)
        low = low or (full is None and param.dtype != torch.float32)
        out[name] = (param.detach() if full is None else full).double().cpu().clone()
    return out, low


def _reference(case: dict[str, Any], weights: dict[str, torch.Tensor], step: int, dp_world: int):
    """The exact step gradient (fp64) by name, and per element the sum over ranks and micro-batches
    of the contributions' magnitudes, in the same (final) units."""
    bf16 = case["dtype"] == "bf16"
    model = ParityNet().to(torch.bfloat16 if bf16 else torch.float64)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            # pipeline names are "<layer>.<rest>", ParityNet's the same
            named[name].copy_(value.to(named[name].dtype))
    several = case["backward"] == "several"
    per_micro = 1.0 if several else 1.0 / case["micro"]
    average = 1.0 / dp_world if case["op"] == "mean" else 1.0
    total = {n: torch.zeros_like(w) for n, w in weights.items()}
    magnitude = {n: torch.zeros_like(w) for n, w in weights.items()}
    dtype = torch.bfloat16 if bf16 else torch.float64
    for r in range(dp_world):
        for k in range(case["micro"]):
            model.zero_grad(set_to_none=True)
            x, y = batch(step, r, k, dtype, every_rank=shared_unused(case))
            (model(x, y) * per_micro).backward()
            for name in weights:
                grad = named[name].grad
                if grad is not None:
                    total[name] += grad.double() * average
                    magnitude[name] += grad.double().abs() * average
    return total, magnitude


def update_bound(case: dict[str, Any], dp_world: int, magnitude: dict, coef: float, *, exact: bool) -> dict:
    """Per element, the largest ``|update - reference update|`` the gradient path can cause, for a step
    whose clipping coefficient is ``coef`` (1 without clipping; the engine's own otherwise).

    Every 8-bit quantization of a value errs by at most one step ``absmax / 127`` of its group
    (stochastic rounding; half a step round-to-nearest). Per step an element meets at most ``K``
    storage requantizations (one per micro-batch) and ``K`` reductions of ``N`` quantizations each
    (``N - 1`` senders and the owner's requantization before the all-gather), so ``Q = K (N + 1)``.
    Groups can mix parameters (buckets, partitions), so the absmax is bounded by ``S``, the largest,
    over all elements, sum of the contributions' magnitudes (in final units every partial sum is
    below it), grown by the errors so far: ``|e| <= Q S (1 + Q/127) / 127``. bf16 adds at most
    ``K + N + 2`` bf16 roundings (2^-8 relative) of values below ``S``; fp32 sums and the fp64 replay
    differ by rounding only (2^-20 relative). An ``exact`` path (no quantizer met; stock DeepSpeed)
    gets the rounding terms alone.
    """
    k = case["micro"]
    q = k * (dp_world + 1)
    s = max(float(m.max()) for m in magnitude.values() if m.numel())
    per_element = 2.0**-20 * s
    if case["dtype"] == "bf16":
        per_element += (k + dp_world + 2) * 2.0**-8 * s
    if not exact:
        per_element += q * s * (1 + q / 127) / 127
    return {name: torch.full_like(m, LR * coef * per_element) for name, m in magnitude.items()}


def clip_coef(norm: float | None) -> float:
    """DeepSpeed's clipping coefficient for a gradient of 2-norm ``norm`` (all hosts alike)."""
    return 1.0 if norm is None else min(1.0, CLIP / (norm + 1e-6))


# --- one run --------------------------------------------------------------------------------------------


def shared_unused(case: dict[str, Any]) -> bool:
    """Whether ``Front.rare`` must be used on every rank alike (then only by each rank's first
    micro-batch): DeepSpeed 0.19.8's ZeRO-1/2/3 optimizers reduce only the parameters with a local
    gradient, so one unused on a single rank makes the ranks' collectives differ (stock aborts in
    gloo). Stage 0, ``BF16_Optimizer`` and the pipeline engine reduce every parameter."""
    return case["host"] in ("z1", "z2", "z3", *OFFLOAD)


def _step(engine, case: dict[str, Any], step: int, dp_rank: int) -> None:
    dtype = torch.bfloat16 if case["dtype"] == "bf16" else torch.float32
    micro = case["micro"]
    if case["host"].startswith("pipe"):
        data = iter([batch(step, dp_rank, k, dtype) for k in range(micro)])
        engine.train_batch(data_iter=data)
        return
    if case["backward"] == "several":
        with engine.coalesce_grad_reduction():
            for k in range(micro):
                x, y = batch(step, dp_rank, k, dtype, every_rank=shared_unused(case))
                loss = engine(x, y)
                engine.set_gradient_accumulation_boundary(k == micro - 1)
                engine.backward(loss)
        engine.step()
        return
    for k in range(micro):
        x, y = batch(step, dp_rank, k, dtype, every_rank=shared_unused(case))
        loss = engine(x, y)
        if case["backward"] == "loss":
            loss.backward()
        else:
            engine.backward(loss)
        engine.step()


def _record_fp32_clip_norm(engine) -> list[float]:
    """ZeRO stage 0 in fp32 clips through ``engine.clip_fp32_gradients`` without keeping the norm:
    the same call, with its result (the global norm) kept."""
    from deepspeed.runtime.utils import clip_grad_norm_

    norms: list[float] = []

    def clip() -> None:
        norm = clip_grad_norm_(engine.module.parameters(), max_norm=engine.gradient_clipping(), mpu=engine.mpu)
        norms.append(float(norm))

    engine.clip_fp32_gradients = clip
    return norms


def _engine_norm(engine, norms: list[float]) -> float:
    """The global gradient norm the engine clipped with in the step just taken."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        norm = norms[-1]
    return float(norm)


def _dp(engine) -> tuple[int, int]:
    from deepspeed import comm as dist

    if hasattr(engine, "grid"):
        return engine.grid.get_data_parallel_rank(), engine.grid.get_data_parallel_world_size()
    return dist.get_rank(), dist.get_world_size()


def run(case: dict[str, Any], agoq: bool) -> dict[str, Any]:
    """Train ``case`` for ``STEPS`` steps; per parameter (this rank's), the worst ratio of the update
    error to its bound, and what the 8-bit and exact checks need. Errors are reported, not raised."""
    try:
        engine = _engine(case, agoq)
    except Exception as exc:  # a refusal at initialize
        return {"error": f"initialize: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    try:
        dp_rank, dp_world = _dp(engine)
        paths = engine.agoq_param_paths() if agoq else {}
        norms = _record_fp32_clip_norm(engine)
        result: dict[str, Any] = {"optimizer": type(engine.optimizer).__name__, "paths": paths, "params": {}}
        full_names = dict(ParityNet().named_parameters())
        for step in range(STEPS):
            before, low = _master(engine)
            # The replay needs every parameter of the model: a pipeline stage fills in the others' from
            # the initial model (their values only shape this stage's gradients through the loss).
            weights = {n: p.detach().double() for n, p in full_names.items() if p.requires_grad}
            weights.update(before)
            if case["host"].startswith("pipe"):
                weights = _pipeline_weights(engine, before, weights)
            ref, magnitude = _reference(case, weights, step, dp_world)
            _step(engine, case, step, dp_rank)
            after, _ = _master(engine)
            norm = _engine_norm(engine, norms) if case["clip"] else None
            coef = clip_coef(norm)
            expected = {name: -LR * coef * g for name, g in ref.items()}
            bounds = update_bound(case, dp_world, magnitude, coef, exact=not agoq)
            bounds_exact = update_bound(case, dp_world, magnitude, coef, exact=True)
            if norm is not None:
                # The engine's norm against the reference's: off by at most the error vector's 2-norm.
                ref_norm = math.sqrt(sum(float((g**2).sum()) for g in ref.values()))
                largest = max(float(b.max()) for b in bounds.values()) / (LR * coef)
                allowed = math.sqrt(sum(g.numel() for g in ref.values())) * largest + 1e-6
                result["norm_ratio"] = max(result.get("norm_ratio", 0.0), abs(norm - ref_norm) / allowed)
            for name in before:
                # The weight read back is rounded when stored, before and after the step (bf16 where no
                # fp32 master is reachable).
                weight = (2.0**-8 if low else 2.0**-23) * (before[name].abs() + after[name].abs())
                bound, bound_exact = bounds[name] + weight, bounds_exact[name] + weight
                err = (after[name] - before[name] - expected[name]).abs()
                row = result["params"].setdefault(name, {"ratio": 0.0, "exact_ratio": 0.0, "zero": False})
                row["ratio"] = max(row["ratio"], float((err / bound).max()))
                row["exact_ratio"] = max(row["exact_ratio"], float((err / bound_exact).max()))
                row["path"] = paths.get(name)
                moved = float((after[name] - before[name]).abs().max())
                # Zero although the reference is farther from zero than the bound allows.
                row["zero"] = row["zero"] or (moved == 0.0 and bool((expected[name].abs() > bound).any()))
                row["ref_max"] = max(row.get("ref_max", 0.0), float(expected[name].abs().max()))
        stats = getattr(engine.optimizer, "agoq_stats", dict)()
        result["offload_bytes"] = stats.get("offload_bytes", 0.0)
        return result
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
    finally:
        engine.destroy()


def _pipeline_weights(engine, mine: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> dict:
    """Every stage's current master weights on every rank (the replay runs the whole model)."""
    from deepspeed import comm as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {n: t for n, t in mine.items()})
    for part in gathered:
        weights.update(part)
    return weights


def run_cases(rank: int, world: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every case stock and with agoq, on this rank (``run_ranks`` entry point). Pipeline cases run
    last: a ``PipelineModule`` leaves DeepSpeed's model-parallel state behind in the process."""
    out = []
    for case in sorted(cases, key=lambda c: c["host"].startswith("pipe")):
        out.append({"case": case, "stock": run(case, False), "agoq": run(case, True)})
    return out


# --- the runtime guard ----------------------------------------------------------------------------------


def guard_checks(rank: int, world: int) -> dict[str, Any]:
    """The ``check_steps`` guard on stage 0 (fp32, 2 micro-batches): a clean run's path counts and
    summary, and the error it raises once the fp32 accumulator's hand-over is broken the way it was
    before the fix (the value read, then the buffer zeroed under it)."""
    from agoq_ds.gradient.accumulator import Fp32Accumulator
    from agoq_ds.summary import startup_summary

    case = dict(host="s0", micro=2, dtype="fp32", clip=False, backward="engine", op="mean", min_numel=1024)
    out: dict[str, Any] = {}
    engine = _engine(case, agoq=True)
    for step in range(STEPS):
        _step(engine, case, step, rank)
    out["stats"] = {k: v for k, v in engine.agoq_stats().items() if k.startswith("gradient/params")}
    out["trainable"] = sum(p.requires_grad for p in engine.module.parameters())
    out["summary"] = startup_summary(engine)
    engine.destroy()

    def broken_take(self: Fp32Accumulator) -> torch.Tensor:
        value = self.dequantize()
        self.reset()
        return value

    original = Fp32Accumulator.take
    Fp32Accumulator.take = broken_take
    try:
        engine = _engine(case, agoq=True)
        try:
            _step(engine, case, 0, rank)
            out["error"] = None
        except RuntimeError as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        engine.destroy()
    finally:
        Fp32Accumulator.take = original
    return out
