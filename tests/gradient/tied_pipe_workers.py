"""A 2-stage pipeline whose embedding and output head share one weight (``TiedLayerSpec``), for the
tied-gradient test (run on real gloo ranks by ``run_ranks``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, HIDDEN, SEQ, MICRO, GA = 256, 64, 16, 2, 2


class TiedEmbedding(nn.Module):
    """Token embedding whose weight the output head reuses."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(VOCAB, HIDDEN) * 0.1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def _head(module: TiedEmbedding, h: torch.Tensor) -> torch.Tensor:
    return h @ module.weight.t()


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def tied_run(rank: int, world: int, agoq: Any, steps: int) -> dict:
    """``steps`` SGD steps; the change of the tied weight on this stage."""
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    torch.manual_seed(0)
    layers = [
        TiedLayerSpec("tokens", TiedEmbedding),
        LayerSpec(nn.Linear, HIDDEN, HIDDEN),
        LayerSpec(nn.Tanh),
        TiedLayerSpec("tokens", TiedEmbedding, forward_fn=_head),
    ]
    model = PipelineModule(layers=layers, num_stages=2, loss_fn=_loss, partition_method="uniform")
    config: dict = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GA,
        "optimizer": {"type": "SGD", "params": {"lr": 0.5}},
        "steps_per_print": 10_000,
    }
    if agoq is not None:
        config["agoq"] = agoq
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    weight = next(p for n, p in model.named_parameters() if "tied_modules" in n)
    before = weight.detach().clone()
    g = torch.Generator().manual_seed(1)

    def batches():
        while True:
            ids = torch.randint(0, VOCAB, (MICRO, SEQ), generator=g)
            yield ids, torch.roll(ids, 1, dims=1)

    data = batches()
    for _ in range(steps):
        engine.train_batch(data_iter=data)
    out = {"stage": engine.stage_id, "delta": (weight.detach() - before).flatten().numpy().copy()}
    engine.destroy()
    return out
