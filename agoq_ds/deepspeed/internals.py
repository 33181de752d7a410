"""The DeepSpeed internals that agoq modules outside this package use, behind one name each.

Outside ``agoq_ds/deepspeed`` nothing imports ``deepspeed.runtime``; what the config model, the
activation checkpointing and the pipeline support need from it comes from here (each listed in
``contract.INTERNALS``, checked by ``contract.check``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deepspeed.runtime.config_utils import DeepSpeedConfigModel

__all__ = ["DeepSpeedConfigModel", "deepspeed_checkpoint_function", "is_pipeline_module", "load_ds_config"]


def is_pipeline_module(model: Any) -> bool:
    """Whether ``model`` is a DeepSpeed ``PipelineModule``."""
    from deepspeed.runtime.pipe.module import PipelineModule

    return isinstance(model, PipelineModule)


def deepspeed_checkpoint_function() -> Callable:
    """DeepSpeed's own (reentrant) activation checkpointing function, ``checkpointing.checkpoint``."""
    from deepspeed.runtime.activation_checkpointing import checkpointing

    return checkpointing.checkpoint


def load_ds_config(source: Any) -> dict[str, Any]:
    """A DeepSpeed config read with DeepSpeed's own loader (a dict, a JSON/hjson path, or base64);
    raises ``ValueError`` for what DeepSpeed cannot read."""
    from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config as load

    return load(source)
