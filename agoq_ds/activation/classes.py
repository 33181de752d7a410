"""The layer classes and their default bits, re-exported from the ground floor (``agoq_ds/layer_classes.py``,
which the config imports without importing the activation package)."""

from __future__ import annotations

from ..layer_classes import (
    ATTENTION_CLASSES,
    ATTENTION_MIN_BITS,
    DEFAULT_CLASS_BITS,
    LOSS_HEAD_MIN_BITS,
    LayerClass,
    resolve_class_bits,
)

__all__ = [
    "ATTENTION_CLASSES",
    "ATTENTION_MIN_BITS",
    "DEFAULT_CLASS_BITS",
    "LOSS_HEAD_MIN_BITS",
    "LayerClass",
    "resolve_class_bits",
]
