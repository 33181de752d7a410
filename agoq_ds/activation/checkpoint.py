"""Quantizing activation-checkpoint functions (HF ``_gradient_checkpointing_func``, DeepSpeed
``PipelineModule(activation_checkpoint_func=...)`` and drop-in for ``deepspeed.checkpointing.checkpoint``).

A checkpointed block stores only its inputs, and where they are stored decides whether agoq sees
them: DeepSpeed's ``CheckpointFunction`` keeps them on ``ctx`` (invisible to saved-tensor hooks),
while torch's non-reentrant checkpoint saves them with ``ctx.save_for_backward`` before its own
hooks take over, so an outer ``saved_tensors_hooks`` packs exactly the block inputs. The functions
here run torch's non-reentrant checkpoint inside agoq's pack context (class ``checkpoint_input``);
inside the block torch's checkpoint hooks are innermost and agoq's per-module hooks stand aside,
and the recomputation in backward is never quantized.

Not supported here (they are model-parallel features of DeepSpeed's own function):
``partition_activations``, ``cpu_checkpointing``, ``contiguous_memory_optimization``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from .. import pipeline_support
from ..pipeline_support import PipelineSupport
from .hooks import PackEngine, active_engine

CHECKPOINT_OPTIONS = frozenset({"preserve_rng_state", "context_fn", "determinism_check", "debug", "early_stop"})
"""Keyword arguments that configure ``torch.utils.checkpoint.checkpoint``; others go to the function."""


class QuantizingCheckpoint:
    """``fn(function, *args, **kwargs)``: non-reentrant checkpoint whose saved inputs are quantized.

    Bound to one ``PackEngine``, or (``engine=None``) to whichever agoq-quantized model is running
    a forward on this thread, so it can be passed to ``PipelineModule`` before the quantizer exists.
    Without an active engine it is plain ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``.
    """

    def __init__(self, engine: PackEngine | None = None) -> None:
        self.engine = engine

    def __call__(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("use_reentrant", None)  # always non-reentrant: the reentrant form hides its inputs
        engine = self.engine if self.engine is not None else active_engine()
        if not torch.is_grad_enabled():
            return function(*args, **{k: v for k, v in kwargs.items() if k not in CHECKPOINT_OPTIONS})
        if engine is None:
            return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)
        with engine.checkpoint_inputs():
            return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)


checkpoint_function = QuantizingCheckpoint()
"""Module-level quantizing checkpoint function, usable before any quantizer exists, e.g.
``PipelineModule(..., activation_checkpoint_func=agoq_ds.activation.checkpoint_function)``."""


def set_hf_checkpoint_function(model: nn.Module, function: Callable) -> dict[nn.Module, Any]:
    """Enable HF activation checkpointing on ``model`` and make every checkpointing layer use
    ``function``; returns the previous functions (for ``restore_hf_checkpoint_function``)."""
    if not any(hasattr(m, "gradient_checkpointing") for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no HF gradient-checkpointing layers")
    enabled = getattr(model, "is_activation_checkpointing", None)
    if enabled is None:  # transformers < 5
        enabled = getattr(model, "is_gradient_checkpointing", False)
    if not enabled:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    previous: dict[nn.Module, Any] = {}
    for m in model.modules():
        if hasattr(m, "gradient_checkpointing"):
            previous[m] = m.__dict__.get("_gradient_checkpointing_func")
            m._gradient_checkpointing_func = function
    return previous


def restore_hf_checkpoint_function(previous: dict[nn.Module, Any]) -> None:
    """Undo ``set_hf_checkpoint_function`` (checkpointing itself stays enabled)."""
    for m, fn in previous.items():
        if fn is None:
            m.__dict__.pop("_gradient_checkpointing_func", None)
        else:
            m._gradient_checkpointing_func = fn


def is_pipeline_module(model: nn.Module, support: PipelineSupport | None = None) -> bool:
    """Whether ``model`` is a DeepSpeed ``PipelineModule`` (``support``: default the one installed in
    ``agoq_ds.pipeline_support``, DeepSpeed's once ``agoq_ds.deepspeed`` has patched DeepSpeed)."""
    return (support or pipeline_support.installed()).is_pipeline_module(model)


def swap_pipeline_checkpoint_function(
    model: nn.Module, function: Callable, support: PipelineSupport | None = None
) -> Callable | None:
    """If ``model`` is a DeepSpeed ``PipelineModule`` checkpointing with DeepSpeed's own
    (reentrant) function, use ``function`` instead; returns the one replaced (else ``None``)."""
    support = support or pipeline_support.installed()
    if not support.is_pipeline_module(model) or model.activation_checkpoint_interval <= 0:
        return None
    if model.activation_checkpoint_func is not support.default_checkpoint_function():
        return None
    previous = model.activation_checkpoint_func
    model.activation_checkpoint_func = function
    return previous
