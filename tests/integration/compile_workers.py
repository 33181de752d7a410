"""Rank functions for the ``engine.compile()`` tests (run on real gloo processes by ``run_ranks``)."""

from __future__ import annotations

from typing import Any

import torch

from . import engine_workers as w


def compiled_run(rank: int, world: int, agoq: Any, compile_: bool, bf16: bool, stage: int, steps: int) -> dict:
    """``steps`` optimizer steps of the tiny LLaMA (eager or ``engine.compile()``d, stock or agoq);
    the losses, agoq's activation statistics and what the compiled packing counted."""
    torch._dynamo.reset()
    engine = w.make_engine(w.ds_config(stage=stage, agoq=agoq, bf16=bf16))
    if compile_:
        engine.compile()
    losses = w.train(engine, w.data_stream(rank, world), steps)
    out: dict = {"losses": losses}
    quantizer = getattr(engine, "agoq_activation", None)
    if quantizer is not None:
        out["stats"] = engine.agoq_stats()
        packing = quantizer._compiled
        if packing is not None:
            out["graphs"] = len(packing.graphs)
            out["runs"] = packing.runs
            out["rebuilt"] = packing.rebuilt
            out["eager_saved"] = packing.eager_saved
    engine.destroy()
    torch._dynamo.reset()
    return out


def regional_compile_error(rank: int, world: int) -> str:
    """Compile the decoder layers one by one (accelerate's regional compilation), then run a forward:
    the message the AGoQ engine raises (or "no error")."""
    engine = w.make_engine(w.ds_config(stage=2, agoq={}))
    for layer in engine.module.model.layers:
        layer.compile()
    batch = next(w.data_stream(rank, world))
    try:
        engine(input_ids=batch, labels=batch)
    except Exception as exc:  # the test reads the message of whatever was raised
        return f"{type(exc).__name__}: {exc}"
    finally:
        engine.destroy()
    return "no error"
