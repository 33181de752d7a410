"""Rank function for the pipeline engine under ``engine.compile()`` (run by ``run_ranks``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from agoq_ds.testing.data import load_bytes
from agoq_ds.testing.models import build_llama, llama_pipeline_layers

SEQ, MICRO, GAS = 32, 2, 2


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())


def pipeline_compiled_run(rank: int, world: int, agoq: Any, compile_: bool, steps: int) -> dict:
    """``steps`` pipeline steps of the tiny LLaMA over ``world`` stages (eager or compiled)."""
    import deepspeed
    from deepspeed.pipe import PipelineModule

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = PipelineModule(layers=llama_pipeline_layers(build_llama("tiny", seed=0)), num_stages=world, loss_fn=_loss)
    config: dict = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GAS,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}},
        "steps_per_print": 10_000,
    }
    if agoq is not None:
        config["agoq"] = agoq
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    if compile_:
        engine.compile()
    tokens = load_bytes(max_bytes=200_000).long()
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            starts = torch.randint(0, len(tokens) - SEQ, (MICRO,), generator=g)
            ids = torch.stack([tokens[s : s + SEQ] for s in starts])
            yield ids, ids

    data = batches()
    losses = [float(engine.train_batch(data_iter=data)) for _ in range(steps)]
    out: dict = {"losses": losses, "stage": engine.stage_id}
    if agoq is not None:
        out["stats"] = engine.agoq_stats()
    engine.destroy()
    torch._dynamo.reset()
    return out
