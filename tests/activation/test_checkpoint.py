"""Activation checkpointing: checkpointed block inputs are stored quantized (HF layers, a
DeepSpeed-style checkpoint call), and gradients still match."""

from __future__ import annotations

import functools

import deepspeed
import torch
from torch import nn

from agoq_ds.activation import ActivationQuantizer, checkpoint_function
from agoq_ds.config import ActivationConfig
from agoq_ds.testing.models import build_llama
from tests.activation.act_helpers import cosines, lm_step, text_batch


def test_hf_gradient_checkpointing_stores_quantized_layer_inputs():
    model = build_llama("tiny").train()
    ids = text_batch()
    ref = lm_step(model, ids)
    quantizer = ActivationQuantizer(model, ActivationConfig()).install()
    quantizer.enable_hf_gradient_checkpointing()
    assert all(
        m._gradient_checkpointing_func is quantizer.checkpoint_function
        for m in model.modules()
        if hasattr(m, "gradient_checkpointing")
    )
    for _ in range(2):
        grads = lm_step(model, ids)
        quantizer.on_step_end()
    by_class = quantizer._current().by_class
    # Inside checkpointed layers nothing else is saved; outside them the embedding/head/loss.
    assert set(by_class) == {"checkpoint_input", "embedding"}
    hidden = 2 * 64 * 128
    assert by_class["checkpoint_input"].tensors == 2  # one per layer
    assert by_class["checkpoint_input"].stored == 2 * (hidden + hidden // 128 * 2)  # 8-bit codes + bf16 scales
    per_layer = {m for (m, c) in quantizer._current().by_module if c == "checkpoint_input"}
    assert per_layer == {"model.layers.0.input_layernorm", "model.layers.1.input_layernorm"}
    assert min(cosines(ref, grads).values()) > 0.999
    quantizer.remove()  # checkpointing stays on, with torch's own function again
    assert not any(
        m.__dict__.get("_gradient_checkpointing_func") is quantizer.checkpoint_function for m in model.modules()
    )


class _Blocks(nn.Module):
    """Two MLP blocks, each run through ``self.checkpoint`` (like DeepSpeed models do)."""

    def __init__(self, checkpoint) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.LayerNorm(128), nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128)) for _ in range(2)]
        )
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + self.checkpoint(block, x)
        return x.square().mean()


_torch_checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)


def _grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x).backward()  # DeepSpeed's reentrant checkpoint does not support autograd.grad
    return [p.grad.clone() for p in model.parameters()]


def test_deepspeed_checkpoint_hides_inputs_while_agoq_checkpoint_quantizes_them():
    x = torch.randn(8, 64, 128, requires_grad=True)
    exact = _grads(_Blocks(_torch_checkpoint), x)
    results = {}
    for name, fn in (("deepspeed", deepspeed.checkpointing.checkpoint), ("agoq", checkpoint_function)):
        model = _Blocks(fn)
        quantizer = ActivationQuantizer(model, ActivationConfig()).install()
        for _ in range(2):
            grads = _grads(model, x)
            quantizer.on_step_end()
        quantizer.remove()
        results[name] = (grads, quantizer._current().by_class)
    # DeepSpeed's CheckpointFunction keeps the inputs on ctx: no hook sees them.
    assert "checkpoint_input" not in results["deepspeed"][1]
    agoq_classes = results["agoq"][1]
    assert agoq_classes["checkpoint_input"].tensors == 2
    assert agoq_classes["checkpoint_input"].quantized_numel == 2 * 8 * 64 * 128
    for grads, _ in results.values():
        for e, g in zip(exact, grads, strict=True):
            assert torch.nn.functional.cosine_similarity(e.flatten(), g.flatten(), dim=0) > 0.999


def test_module_level_checkpoint_function_without_quantizer_is_plain_checkpoint():
    x = torch.randn(4, 16, 128, requires_grad=True)
    exact = _grads(_Blocks(_torch_checkpoint), x)
    plain = _grads(_Blocks(checkpoint_function), x)
    for e, g in zip(exact, plain, strict=True):
        assert torch.equal(e, g)
