"""The DeepSpeed internals that agoq modules outside this package use, behind one name each.

Outside ``agoq_ds/deepspeed`` nothing imports ``deepspeed.runtime``, and ``config.py`` and
``activation/`` import nothing from this package: the activation checkpointing learns about
``PipelineModule`` through ``agoq_ds.pipeline_support``, where ``integration.patch_deepspeed``
installs ``PIPELINE`` (and the AGoQ engine passes it to its ``ActivationQuantizer``). Each internal is
listed in ``contract.INTERNALS``, checked by ``contract.check``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..pipeline_support import PipelineSupport

__all__ = ["PIPELINE", "deepspeed_checkpoint_function", "is_pipeline_module", "load_ds_config"]


def is_pipeline_module(model: Any) -> bool:
    """Whether ``model`` is a DeepSpeed ``PipelineModule``."""
    from deepspeed.runtime.pipe.module import PipelineModule

    return isinstance(model, PipelineModule)


def deepspeed_checkpoint_function() -> Callable:
    """DeepSpeed's own (reentrant) activation checkpointing function, ``checkpointing.checkpoint``."""
    from deepspeed.runtime.activation_checkpointing import checkpointing

    return checkpointing.checkpoint


class DeepSpeedPipelineSupport(PipelineSupport):
    """``PipelineModule`` and DeepSpeed's ``checkpointing.checkpoint`` for the activation checkpointing."""

    def is_pipeline_module(self, model: Any) -> bool:
        return is_pipeline_module(model)

    def default_checkpoint_function(self) -> Callable:
        return deepspeed_checkpoint_function()


PIPELINE = DeepSpeedPipelineSupport()
"""DeepSpeed's pipeline support: installed as the default by ``integration.patch_deepspeed`` and
passed by the engine to its ``ActivationQuantizer``."""


def load_ds_config(source: Any) -> dict[str, Any]:
    """A DeepSpeed config read with DeepSpeed's own loader (a dict, a JSON/hjson path, or base64);
    raises ``ValueError`` for what DeepSpeed cannot read."""
    from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config as load

    return load(source)
