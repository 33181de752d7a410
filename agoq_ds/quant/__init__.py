"""Blockwise int8/int4/int2 quantization with one API and several kernel backends.

``quantize(x, bits, group_size, ...) -> QuantizedTensor`` and ``dequantize(q)``; the format is
defined in ``format.py``, the pure-torch reference in ``reference.py``, the dispatcher ops in
``ops.py``, the backend choice (``Kernels``, one per engine; a process default) in ``backends.py``.
"""

from .backends import (
    BACKEND_NAMES,
    BackendUnavailable,
    Kernels,
    all_status,
    default_kernels,
    kernels_for,
    select,
    set_preferred,
)
from .format import QuantizedTensor, bound, stochastic_bound
from .ops import dequantize, quantize

__all__ = [
    "BACKEND_NAMES",
    "BackendUnavailable",
    "Kernels",
    "QuantizedTensor",
    "all_status",
    "bound",
    "default_kernels",
    "dequantize",
    "kernels_for",
    "quantize",
    "select",
    "set_preferred",
    "stochastic_bound",
]
