"""Blockwise int8/int4/int2 quantization with one API and several kernel backends.

``quantize(x, bits, group_size, ...) -> QuantizedTensor`` and ``dequantize(q)``; the format is
defined in ``format.py``, the pure-torch reference in ``reference.py``, backend choice in
``backends.py``.
"""

from .backends import BACKEND_NAMES, BackendUnavailable, all_status, select, set_preferred
from .format import QuantizedTensor, bound, stochastic_bound
from .ops import dequantize, quantize

__all__ = [
    "BACKEND_NAMES",
    "BackendUnavailable",
    "QuantizedTensor",
    "all_status",
    "bound",
    "dequantize",
    "quantize",
    "select",
    "set_preferred",
    "stochastic_bound",
]
