"""Layer-aware activation quantization (LAAQ).

The data path, top to bottom: ``ActivationConfig`` (config.py) -> ``quantizer.ActivationQuantizer``
(lifecycle, calibration, reports) -> ``policy.BitPolicy`` (bits per module and class, fed by
``allocate``: budget mode and pipeline-stage balancing) -> ``hooks.PackEngine`` (per-module
``saved_tensors_hooks``; ``classify`` + ``trace`` say which class a tensor is) ->
``storage.SavedTensor`` (quantized holders, exact byte accounting) -> ``agoq_ds.quant``.
``checkpoint`` adds the quantizing activation-checkpoint functions; ``report`` the tables.
"""

from .checkpoint import QuantizingCheckpoint, checkpoint_function, set_hf_checkpoint_function
from .classes import DEFAULT_CLASS_BITS, LayerClass
from .quantizer import ActivationQuantizer

__all__ = [
    "DEFAULT_CLASS_BITS",
    "ActivationQuantizer",
    "LayerClass",
    "QuantizingCheckpoint",
    "checkpoint_function",
    "set_hf_checkpoint_function",
]
