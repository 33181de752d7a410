"""A 2-stage DeepSpeed ``PipelineModule`` of HF LLaMA layers, run on real gloo ranks by
test_pipeline.py (top level so that spawn can pickle it). Returns plain numbers; the assertions
live in the test module."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, HIDDEN, SEQ, MICRO, GAS = 256, 128, 64, 2, 4


def _llama_config():
    from agoq_ds.testing.models import llama_config

    return llama_config("tiny", hidden_size=HIDDEN, num_hidden_layers=3)


class EmbedPipe(nn.Module):
    """Token embedding (pipeline layer 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)


class BlockPipe(nn.Module):
    """One HF ``LlamaDecoderLayer`` with its rotary table."""

    def __init__(self, idx: int) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        cfg = _llama_config()
        self.layer = LlamaDecoderLayer(cfg, idx)
        self.rotary = LlamaRotaryEmbedding(cfg)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(h.shape[1]).unsqueeze(0)
        return self.layer(h, position_embeddings=self.rotary(h, pos))


class HeadPipe(nn.Module):
    """Final norm and LM head."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.norm = LlamaRMSNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h))


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())


def _batches(steps: int):
    from agoq_ds.testing.data import load_bytes

    tokens = load_bytes(max_bytes=400_000).long()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps * GAS):
        starts = torch.randint(0, len(tokens) - SEQ, (MICRO,), generator=g)
        ids = torch.stack([tokens[s : s + SEQ] for s in starts])
        yield ids, ids


def pipeline_runs(rank: int, world: int, scenarios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run each scenario (``pipeline_run``'s keyword arguments) in turn on this rank."""
    return [pipeline_run(**scenario) for scenario in scenarios]


def pipeline_run(activation: dict[str, Any] | None, checkpoint: str | None, steps: int) -> dict[str, Any]:
    """Train ``steps`` pipeline steps (SGD) from a fixed init; ``activation`` is an ``agoq``
    activation block (``None``: no quantizer); ``checkpoint`` is ``"deepspeed"`` (DeepSpeed's own
    function, swapped by the quantizer), ``"agoq"`` (the module-level quantizing function passed
    to ``PipelineModule``) or ``None``. Returns losses, parameter deltas of this stage and, with a
    quantizer, its stats, table and stage decisions."""
    import time

    import deepspeed
    from deepspeed.pipe import PipelineModule
    from deepspeed.utils import logger

    from agoq_ds.activation import ActivationQuantizer, checkpoint_function
    from agoq_ds.config import ActivationConfig

    logger.setLevel(logging.WARNING)
    torch.manual_seed(0)
    layers = [EmbedPipe(), BlockPipe(0), BlockPipe(1), BlockPipe(2), HeadPipe()]
    model = PipelineModule(
        layers=layers,
        num_stages=2,
        loss_fn=lm_loss,
        partition_method="uniform",
        activation_checkpoint_interval=1 if checkpoint else 0,
        checkpointable_layers=["BlockPipe"],  # DeepSpeed's reentrant function cannot take the token ids
        activation_checkpoint_func=checkpoint_function if checkpoint == "agoq" else deepspeed.checkpointing.checkpoint,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GAS,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
        "steps_per_print": 10_000,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    quantizer = None
    if activation is not None:
        quantizer = ActivationQuantizer(
            model,
            ActivationConfig(**activation),
            stage_id=engine.stage_id,
            num_stages=engine.num_stages,
            micro_batches=engine.micro_batches,
        ).install()
    data = _batches(steps)
    losses, stats, times = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(float(engine.train_batch(data_iter=data)))
        times.append(time.perf_counter() - t0)
        if quantizer is not None:
            quantizer.on_step_end()
            stats.append(quantizer.stats())
    out: dict[str, Any] = {
        "stage": engine.stage_id,
        "losses": losses,
        "times": times,
        "deltas": {n: (p.detach() - before[n]).flatten().numpy().copy() for n, p in model.named_parameters()},
        "checkpoint_func": getattr(model.activation_checkpoint_func, "__qualname__", ""),
    }
    if quantizer is not None:
        out.update(
            stats=stats,
            table=quantizer.table(),
            stage_peaks=quantizer.stage_peaks,
            overrides={f"{m}:{c}": b for (m, c), b in quantizer.policy.overrides.items()},
            report=quantizer.report(per_layer=True),
            holds=quantizer.holds,
            checkpoint_func=getattr(
                model.activation_checkpoint_func, "__qualname__", type(model.activation_checkpoint_func).__name__
            ),
        )
        quantizer.remove()
    return out
