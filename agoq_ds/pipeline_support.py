"""How the activation checkpointing recognises a pipeline model: the injection point that keeps
``activation/`` free of DeepSpeed.

The default ``PipelineSupport`` recognises no pipeline model. ``agoq_ds.deepspeed`` installs
DeepSpeed's (``internals.PIPELINE``: ``PipelineModule`` and its reentrant ``checkpointing.checkpoint``)
as soon as DeepSpeed is patched (``integration.patch_deepspeed``, which the autoload hook runs when
``deepspeed`` is imported), and the AGoQ engine hands the same to its ``ActivationQuantizer``. On the
ground floor, importing nothing, so installing it costs nothing at ``import deepspeed``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class PipelineSupport:
    """Recognises a pipeline model and the checkpoint function it uses unless told otherwise."""

    def is_pipeline_module(self, model: Any) -> bool:
        """Whether ``model`` is a pipeline model (with ``activation_checkpoint_interval``,
        ``activation_checkpoint_func`` and ``loss_fn``)."""
        return False

    def default_checkpoint_function(self) -> Callable | None:
        """The checkpoint function a pipeline model uses unless told otherwise (``None``: none)."""
        return None


_installed = PipelineSupport()


def install(support: PipelineSupport) -> None:
    """Make ``support`` the default (``agoq_ds.deepspeed`` installs DeepSpeed's)."""
    global _installed
    _installed = support


def installed() -> PipelineSupport:
    """The installed ``PipelineSupport`` (the default one recognises no pipeline model)."""
    return _installed
