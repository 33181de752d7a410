"""Rank functions for the engine tests (run on real gloo processes by ``distributed.run_ranks``)."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import deepspeed
import torch

from agoq_ds.testing.data import batches, load_bytes, split
from agoq_ds.testing.models import build_llama

SEQ = 32
MICRO = 2


def ds_config(stage: int = 2, agoq: Any = None, bf16: bool = False, **extra: Any) -> dict:
    """A small ZeRO config (torch AdamW); ``agoq`` is the block, or None for none."""
    cfg: dict = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 2,
        "steps_per_print": 1000,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 200_000},
        "bf16": {"enabled": bf16},
    }
    if agoq is not None:
        cfg["agoq"] = agoq
    cfg.update(extra)
    return cfg


def make_engine(config: dict, seed: int = 0, explicit: bool = False):
    """A tiny LLaMA in a DeepSpeed engine (through the patched or the explicit initialize)."""
    model = build_llama("tiny", seed=seed)
    init = deepspeed.initialize
    if explicit:
        import agoq_ds

        init = agoq_ds.initialize
    engine, *_ = init(model=model, model_parameters=model.parameters(), config=copy.deepcopy(config))
    return engine


def data_stream(rank: int, world: int, skip_micro_batches: int = 0):
    """The training batches of this rank, resumable by skipping micro-batches already consumed."""
    train, _ = split(load_bytes(max_bytes=200_000))
    stream = batches(train, MICRO, SEQ, seed=7, rank=rank, world_size=world)
    return itertools.islice(stream, skip_micro_batches, None)


def train(engine, stream, steps: int) -> list[float]:
    """``steps`` optimizer steps; returns the loss of each micro-batch."""
    losses = []
    for _ in range(steps * engine.gradient_accumulation_steps()):
        batch = next(stream)
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.float().item())
    return losses


def engine_type(rank: int, world: int, config: dict, explicit: bool = False) -> str:
    """Name of the engine class ``initialize`` returns for ``config``."""
    return type(make_engine(config, explicit=explicit)).__name__


def initialize_error(rank: int, world: int, config: dict) -> str:
    """The message of the exception ``initialize`` raises for ``config`` (or "no error")."""
    try:
        make_engine(config)
    except Exception as exc:  # the test inspects the message of whatever was raised
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def offload_outcome(rank: int, world: int, config: dict) -> dict:
    """Train ``config`` (an offload config) a few steps: what agoq runs and the losses."""
    engine = make_engine(config)
    losses = train(engine, data_stream(rank, world), 3)
    stats = engine.agoq_stats()
    return {
        "engine": type(engine).__name__,
        "gradient_path": engine.agoq_gradient_path() is not None,
        "avg_bits": stats.get("activation/avg_bits", 16.0),
        "losses": losses,
        "offload_bytes": stats.get("gradient/offload_bytes", 0.0),
        "offload_bytes_baseline": stats.get("gradient/offload_bytes_baseline", 0.0),
    }


def assert_active_outcome(rank: int, world: int, config: dict) -> str:
    """What ``agoq_ds.assert_active`` says about the engine built from ``config``."""
    import agoq_ds

    engine = make_engine(config)
    try:
        agoq_ds.assert_active(engine)
    except RuntimeError as exc:
        return str(exc)
    return "active"


def monitor_and_stats(rank: int, world: int, config: dict, steps: int) -> dict:
    """Train; return the agoq stats and the report text."""
    engine = make_engine(config)
    train(engine, data_stream(rank, world), steps)
    return {"stats": engine.agoq_stats(), "report": engine.agoq_report()}


def uninterrupted(rank: int, world: int, config: dict, steps: int) -> list[float]:
    """Losses of ``steps`` steps in one go."""
    return train(make_engine(config), data_stream(rank, world), steps)


def save_then_resume(rank: int, world: int, config: dict, steps: int, ckpt_dir: str, resume_config: dict) -> dict:
    """Train ``steps // 2`` steps and checkpoint; a fresh engine built from ``resume_config`` loads
    it and trains the rest. Returns the losses and the parameters right after loading."""
    half = steps // 2
    first = make_engine(config)
    losses = train(first, data_stream(rank, world), half)
    first.save_checkpoint(ckpt_dir, tag="half")
    saved_params = [p.detach().float().clone() for p in first.module.parameters()]
    agoq_state = first.agoq_state_dict() if hasattr(first, "agoq_state_dict") else None
    del first

    second = make_engine(resume_config, seed=99)  # different init: loading must overwrite it
    load_path, client_state = second.load_checkpoint(ckpt_dir, tag="half")
    loaded_params = [p.detach().float().clone() for p in second.module.parameters()]
    params_match = all(torch.equal(a, b) for a, b in zip(saved_params, loaded_params, strict=True))
    state_restored = (
        agoq_state is not None
        and hasattr(second, "agoq_state_dict")
        and _same_state(second.agoq_state_dict(), agoq_state)
    )
    consumed = half * second.gradient_accumulation_steps()
    losses += train(second, data_stream(rank, world, skip_micro_batches=consumed), steps - half)
    return {
        "losses": losses,
        "loaded": load_path is not None,
        "params_match": params_match,
        "client_keys": sorted(client_state or {}),
        "agoq_state_restored": state_restored,
    }


def _same_state(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def host_syncs_per_step(rank: int, world: int, configs: dict[str, dict], warmup_steps: int = 2) -> dict[str, Any]:
    """Per named config: host synchronisations of one steady-state optimizer step (forward, backward
    and step of every micro-batch) after ``warmup_steps`` (the first traces the model), and where
    each was asked for."""
    from agoq_ds.testing.host_sync import HostSyncCounter

    out = {}
    for name, config in configs.items():
        engine = make_engine(config)
        stream = data_stream(rank, world)
        train(engine, stream, warmup_steps)
        with HostSyncCounter() as syncs:
            for _ in range(engine.gradient_accumulation_steps()):
                batch = next(stream)
                loss = engine(input_ids=batch, labels=batch).loss
                engine.backward(loss)
                engine.step()
        out[name] = {"total": syncs.total, "where": dict(syncs.where), "agoq": hasattr(engine, "agoq_stats")}
        del engine
    return out


def overflow_streak_warnings(rank: int, world: int, overflowing_steps: range, steps: int) -> int:
    """Train ``steps`` optimizer steps with an infinite loss in ``overflowing_steps``; how many times
    the engine logged the overflow-streak warning."""
    import logging

    from deepspeed.utils import logger

    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger.addHandler(handler)
    engine = make_engine(ds_config(2, {}))
    stream = data_stream(rank, world)
    for step in range(steps):
        for _ in range(engine.gradient_accumulation_steps()):
            batch = next(stream)
            loss = engine(input_ids=batch, labels=batch).loss
            engine.backward(loss * float("inf") if step in overflowing_steps else loss)
            engine.step()
    logger.removeHandler(handler)
    return sum("consecutive optimizer steps" in m for m in messages)


def activation_storage(rank: int, world: int, config: dict, steps: int) -> dict:
    """Train; return the activation statistics (per class and module) and the classification."""
    engine = make_engine(config)
    train(engine, data_stream(rank, world), steps)
    quantizer = engine.agoq_activation
    return {
        "stats": quantizer.stats(per_module=True),
        "classes": quantizer.classes(),
        "replayed": quantizer.engine.replayed,
    }
