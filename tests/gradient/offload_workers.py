"""ZeRO-Offload scenarios on real gloo ranks for ``test_offload.py`` (top level, so spawn can pickle
them). Each returns plain numbers; the assertions live in the test module.

With ``DS_ACCELERATOR=cpu`` the "device" and the "host" are the same memory, so the bytes that would
cross PCIe are counted where DeepSpeed and agoq issue them: every ``copy_(..., non_blocking=True)``
during backward (the offload copies are the only non-blocking copies there, in both paths; the step's
parameter copy back is outside backward and is not a gradient).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tests.gradient.grad_workers import _mlp_batch, _overflow_run, make_engine, small_mlp
from tests.gradient.grad_workers import _residuals as gradient_residuals

OFFLOAD = {"offload_optimizer": {"device": "cpu"}}
"""The ``zero_optimization`` keys of ZeRO-Offload."""


def offload_config(
    stage: int, ga: int, bf16: bool = False, offload: bool = True, params: bool = True
) -> dict[str, Any]:
    """``grad_workers.ds_config`` with CPU optimizer offload (at ZeRO-3 parameter offload too, unless
    ``params`` is false: the byte count leaves it out, its copies move parameters, not gradients)."""
    from tests.gradient.grad_workers import ds_config

    zero: dict[str, Any] = dict(OFFLOAD) if offload else {}
    if offload and params and stage == 3:
        zero["offload_param"] = {"device": "cpu"}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=0)
    return ds_config(stage, ga=ga, bf16=bf16, **zero)


def zero3_partition_numel(engine, rank: int) -> int:
    """Elements of data (padding left out) in the ZeRO-3 gradient partitions of ``rank``: what
    DeepSpeed's offload path copies per micro-step."""
    params = [p for group in engine.optimizer.fp16_groups for p in group]
    return sum(max(0, min(p.partition_numel(), p.ds_numel - rank * p.partition_numel())) for p in params)


DEVICE_LOCAL = frozenset({"__add_grad_to_ipg_bucket"})
"""DeepSpeed functions whose non-blocking copies stay on the device (ZeRO-3 copies each gradient into
its contiguous bucket that way): not counted."""


def _device_local() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name in DEVICE_LOCAL:
            return True
        frame = frame.f_back
    return False


class NonBlockingCopies(TorchDispatchMode):
    """Counts the source bytes of every non-blocking ``copy_`` while it is active (but ``DEVICE_LOCAL``)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.copy_.default:
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            if non_blocking and not _device_local():
                src = args[1]
                self.bytes += src.numel() * src.element_size()
        return func(*args, **kwargs)


def _train(engine, gen: torch.Generator, steps: int, ga: int, copies: NonBlockingCopies | None = None) -> list[dict]:
    rows = []
    for _ in range(steps):
        before = copies.bytes if copies else 0
        for _ in range(ga):
            x, y = _mlp_batch(gen)
            dtype = next(engine.module.parameters()).dtype
            loss = nn.functional.mse_loss(engine(x.to(dtype)), y.to(dtype))
            if copies is None:
                engine.backward(loss)
            else:
                with copies:
                    engine.backward(loss)
            engine.step()
        stats = engine.optimizer.agoq_stats() if hasattr(engine.optimizer, "agoq_stats") else {}
        rows.append({"loss": float(loss.detach()), "copied": (copies.bytes - before) if copies else 0, **stats})
    return rows


def bytes_checks(rank: int, world: int) -> dict[str, Any]:
    """Per stage, accumulation and dtype: the device<->host gradient bytes counted at the copies, for
    stock and agoq, and agoq's meter (its own bytes and its figure for stock's)."""
    out = {}
    for stage in (1, 2, 3):
        for ga in (1, 8):
            for bf16 in (False, True):
                name = f"s{stage}_ga{ga}_{'bf16' if bf16 else 'fp32'}"
                row: dict[str, Any] = {}
                for label, agoq in (("stock", None), ("agoq", {})):
                    engine = make_engine(small_mlp(), offload_config(stage, ga, bf16, params=False), agoq)
                    copies = NonBlockingCopies()
                    row[label] = _train(engine, torch.Generator().manual_seed(3 + rank), 2, ga, copies)
                    row[f"{label}_optimizer"] = type(engine.optimizer).__name__
                    if stage == 3:
                        row["partition_numel"] = zero3_partition_numel(engine, rank)
                        row["accumulation_bytes"] = engine.optimizer.gradient_accumulation_dtype.itemsize
                    engine.destroy()
                out[name] = row
    return out


def overflow_checks(rank: int, world: int) -> dict[str, Any]:
    """Inf/NaN injected on rank 0 in step 1, with offload: the same outcome as stock DeepSpeed."""
    out = {}
    cases = {
        "s2_fp32_inf": (2, False, float("inf")),
        "s1_bf16_nan": (1, True, float("nan")),
        "s3_bf16_inf": (3, True, float("inf")),
    }
    for name, (stage, bf16, value) in cases.items():
        zero = {**OFFLOAD, "offload_param": {"device": "cpu"}} if stage == 3 else OFFLOAD
        out[name] = {
            "stock": _overflow_run(rank, stage, bf16, None, value, **zero),
            "agoq": _overflow_run(rank, stage, bf16, {}, value, **zero),
        }
    return out


class WithUnused(nn.Module):
    """``small_mlp`` plus a parameter no forward uses."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = small_mlp()
        self.unused = nn.Parameter(torch.ones(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def unused_parameter_checks(rank: int, world: int) -> dict[str, str]:
    """ZeRO-2 offload with a parameter no forward uses: what a step says, stock and agoq, with
    ``ignore_unused_parameters`` false (DeepSpeed's offloaded norm asserts) and true (it trains). One
    rank, as DeepSpeed's own test: on several, only the rank owning the parameter asserts and the
    others wait in the norm's all-reduce (stock DeepSpeed alike)."""
    out = {}
    for ignore in (False, True):
        for label, agoq in (("stock", None), ("agoq", {})):
            config = offload_config(2, 2)
            config["zero_optimization"]["ignore_unused_parameters"] = ignore
            engine = make_engine(WithUnused(), config, agoq)
            gen = torch.Generator().manual_seed(rank)
            try:
                _train(engine, gen, 1, 2)
                outcome = "trained"
            except AssertionError as exc:
                outcome = "ignore_unused_parameters" if "ignore_unused_parameters" in str(exc) else str(exc)[:200]
            engine.destroy()
            out[f"{label}_{'ignore' if ignore else 'check'}"] = outcome
    return out


def _weights(engine) -> list[torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return [p.detach().float().clone() for p in params]


def checkpoint_checks(rank: int, world: int, directory: str) -> dict[str, Any]:
    """Save at step 3 with offload, resume, and compare with the uninterrupted run; then load the same
    checkpoint without offload, and a stock offload checkpoint with agoq."""
    out = {}
    ga = 3
    for stage in (1, 2, 3):
        path = os.path.join(directory, f"offload{stage}")
        engine = make_engine(small_mlp(), offload_config(stage, ga), {})
        gen = torch.Generator().manual_seed(50 + rank)
        _train(engine, gen, 3, ga)
        engine.save_checkpoint(path, tag="t3")
        saved_weights, saved_residuals = _weights(engine), gradient_residuals(engine)
        state = gen.get_state()
        uninterrupted = [r["loss"] for r in _train(engine, gen, 3, ga)]

        resumed_engine = make_engine(small_mlp(seed=1), offload_config(stage, ga), {})
        resumed_engine.load_checkpoint(path, tag="t3")
        loaded_residuals = gradient_residuals(resumed_engine)
        gen.set_state(state)
        resumed = [r["loss"] for r in _train(resumed_engine, gen, 3, ga)]

        without = make_engine(small_mlp(seed=1), offload_config(stage, ga, offload=False), {})
        without.load_checkpoint(path, tag="t3")
        weights_without = _weights(without)
        gen.set_state(state)
        losses_without = [r["loss"] for r in _train(without, gen, 1, ga)]

        stock = make_engine(small_mlp(seed=1), offload_config(stage, ga), None)
        stock.load_checkpoint(path, tag="t3")
        stock_path = os.path.join(directory, f"stock_offload{stage}")
        stock.save_checkpoint(stock_path, tag="s")
        from_stock = make_engine(small_mlp(seed=2), offload_config(stage, ga), {})
        from_stock.load_checkpoint(stock_path, tag="s")
        gen.set_state(state)
        losses_from_stock = [r["loss"] for r in _train(from_stock, gen, 1, ga)]

        out[f"s{stage}"] = {
            "uninterrupted": uninterrupted,
            "resumed": resumed,
            "residual_nonzero": any(int(torch.count_nonzero(v)) > 0 for v in saved_residuals.values()),
            "residual_restored": saved_residuals.keys() == loaded_residuals.keys()
            and all(torch.equal(saved_residuals[k], loaded_residuals[k]) for k in saved_residuals),
            "weights_without_offload_match": all(
                torch.equal(a, b) for a, b in zip(saved_weights, weights_without, strict=True)
            ),
            "loss_without_offload": losses_without[0],
            "loss_from_stock": losses_from_stock[0],
            "first_uninterrupted": uninterrupted[0],
        }
        for e in (engine, resumed_engine, without, stock, from_stock):
            e.destroy()
    return out


def world2(rank: int, world: int, directory: str) -> dict[str, Any]:
    """Every scenario on 2 ranks (one process group)."""
    return {
        "bytes": bytes_checks(rank, world),
        "overflow": overflow_checks(rank, world),
        "checkpoint": checkpoint_checks(rank, world, directory),
        "overlap": overlap_checks(rank, world),
    }


class BackwardOrder(TorchDispatchMode):
    """Logs, in order, the matrix products and the bytes of the non-blocking copies to the host (as
    ``NonBlockingCopies`` counts them) that run while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.events.append(("mm", 0))
        elif func is torch.ops.aten.copy_.default:
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            if non_blocking and not _device_local():
                self.events.append(("copy", args[1].numel() * args[1].element_size()))
        return func(*args, **kwargs)

    def share_before_last_mm(self) -> tuple[int, int]:
        """(bytes copied before the last matrix product, bytes copied)."""
        last_mm = max(i for i, (kind, _) in enumerate(self.events) if kind == "mm")
        copies = [(i, n) for i, (kind, n) in enumerate(self.events) if kind == "copy"]
        return sum(n for i, n in copies if i < last_mm), sum(n for _, n in copies)


WIDTH = 64
"""Width of ``deep_mlp``: a weight holds ``WIDTH**2 / 2`` elements per rank, 16 quantization groups."""


def deep_mlp(seed: int = 0) -> nn.Module:
    """Six layers; with ``reduce_bucket_size`` ``WIDTH**2`` each weight fills its own bucket, so
    buckets are reduced while backward still has layers to go."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(7, WIDTH), nn.Tanh()]
    for _ in range(4):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 3))


def overlap_checks(rank: int, world: int) -> dict[str, Any]:
    """Per stage, stock and agoq: of the bytes copied to the host in the boundary backward, those copied
    before its last matrix product (while gradients of earlier layers were still being computed)."""
    out: dict[str, Any] = {}
    for stage in (1, 2, 3):
        for label, agoq in (("stock", None), ("agoq", {})):
            config = offload_config(stage, 1, params=False)
            config["zero_optimization"]["reduce_bucket_size"] = WIDTH**2
            engine = make_engine(deep_mlp(), config, agoq)
            x, y = _mlp_batch(torch.Generator().manual_seed(5 + rank))
            loss = nn.functional.mse_loss(engine(x), y)
            order = BackwardOrder()
            with order:
                engine.backward(loss)
            engine.step()
            early, total = order.share_before_last_mm()
            row = {"early": early, "total": total}
            if agoq is not None:
                stats = engine.optimizer.agoq_stats()
                row.update(offload_bytes=stats["offload_bytes"], during_backward=stats["offload_bytes_during_backward"])
            out[f"s{stage}_{label}"] = row
            engine.destroy()
    return out
