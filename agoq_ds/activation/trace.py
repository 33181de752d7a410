"""What a forward pass reveals about a model's structure, recorded for ``classify.py``.

``Trace`` records every module call (who called it, which tensors went in and came out) and the
telling functions called directly in each module's scope: the attention kernel
(``scaled_dot_product_attention``, a softmax over a >= 4-D score tensor) and elementwise activation
functions. ``OpWatcher`` is the ``TorchFunctionMode`` that sees those functions; it also brackets
every SDPA call so that the pack hooks can tell SDPA's q/k from its v/output (``AttentionOp``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .identity import Storages, ViewKey


def tensors_in(*objs: Any) -> list[torch.Tensor]:
    """The strided tensors in ``objs`` and in tuples/lists/dicts among them (one level deep)."""
    found: list[torch.Tensor] = []
    for obj in objs:
        items: Iterable[Any]
        if isinstance(obj, dict):
            items = obj.values()
        elif isinstance(obj, tuple | list):
            items = obj
        else:
            items = (obj,)
        for item in items:
            if isinstance(item, torch.Tensor) and item.layout == torch.strided:
                found.append(item)
            elif isinstance(item, tuple | list):
                found += [x for x in item if isinstance(x, torch.Tensor) and x.layout == torch.strided]
    return found


ATTENTION = "attention"
"""Op kind: the attention kernel ran in this scope."""
ACTIVATION = "activation"
"""Op kind: an elementwise activation function ran in this scope."""


@dataclass
class CallRecord:
    """One module call seen in a traced forward."""

    module: int
    """Index of the module (in ``Classifier.modules``)."""
    parent: int
    """Index of the calling record, -1 for an outermost call."""
    inputs: set[tuple]
    """View keys (``identity.Storages.view_key``) of the tensors passed in (args and kwargs)."""
    outputs: set[tuple] = field(default_factory=set)
    """View keys of the tensors returned."""
    ops: set[str] = field(default_factory=set)
    """Op kinds called directly in this module's scope (``ATTENTION``, ``ACTIVATION``)."""


class Trace:
    """Module calls (in call order) and the ops seen in each call's own scope."""

    def __init__(self, storages: Storages) -> None:
        self.calls: list[CallRecord] = []
        """Every call seen, in the order calls started."""
        self._open: list[int] = []
        self._storages = storages
        """Identity of the tensors passed (``identity.Storages``, cleared at the end of each forward):
        a freed tensor's address reused by a new tensor of the same shape must not link calls that
        never exchanged data (nor make the classification depend on allocator history), and holding
        the tensors instead would keep every module's input and output alive through the traced
        forward (stock frees what it does not save)."""

    def _keys(self, *objs: Any) -> set[ViewKey]:
        return {self._storages.view_key(t) for t in tensors_in(*objs)}

    def enter(self, module: int, args: tuple, kwargs: dict) -> None:
        """A module call starts."""
        parent = self._open[-1] if self._open else -1
        self.calls.append(CallRecord(module, parent, self._keys(args, kwargs)))
        self._open.append(len(self.calls) - 1)

    def exit(self, output: Any) -> None:
        """The innermost open call returns ``output``."""
        if self._open:
            self.calls[self._open.pop()].outputs = self._keys(output)

    def op(self, kind: str) -> None:
        """An op of ``kind`` runs in the innermost open call's own scope."""
        if self._open:
            self.calls[self._open[-1]].ops.add(kind)

    def reset_open(self) -> None:
        """A forward ended: forget unfinished calls (a forward that raised)."""
        self._open.clear()


ACTIVATIONS = (
    F.silu,
    F.gelu,
    F.relu,
    F.relu6,
    F.elu,
    F.selu,
    F.celu,
    F.leaky_relu,
    F.mish,
    F.softplus,
    F.hardswish,
    F.hardsigmoid,
    F.sigmoid,
    F.tanh,
    F.glu,
    torch.sigmoid,
    torch.tanh,
    torch.relu,
    torch.Tensor.sigmoid,
    torch.Tensor.tanh,
    torch.Tensor.relu,
)
_SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax)
_LOG_SOFTMAX = (F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax, F.cross_entropy)
_EXACT = (
    torch.amax,
    torch.Tensor.amax,
    torch.amin,
    torch.Tensor.amin,
    torch.max,
    torch.Tensor.max,
    torch.min,
    torch.Tensor.min,
    torch.aminmax,
    torch.Tensor.aminmax,
    torch.norm,
    torch.Tensor.norm,
    torch.linalg.vector_norm,
    torch.linalg.norm,
)
"""Ops whose backward compares saved tensors for equality (``input == max``: amax/amin, full
max/min, inf-norms): a quantized input or output matches nowhere and the gradient becomes 0/0."""


@dataclass
class AttentionOp:
    """One SDPA call in progress: its q/k/v and the holders packed while it runs."""

    q: ViewKey
    """Key of the query."""
    k: ViewKey
    """Key of the key."""
    v: ViewKey
    """Key of the value."""
    statistic_numel: int = 0
    """Saved tensors matching none of q/k/v/output and at most this large are softmax statistics
    (the log-sum-exp has ``numel(q) / head_dim`` elements); larger ones (e.g. padded copies a GPU
    kernel made of q/k/v) are treated like q/k."""
    packed: list[tuple[Any, torch.Tensor | None]] = field(default_factory=list)
    """(holder, the tensor it came from) for each tensor SDPA saved."""


class OpWatcher(TorchFunctionMode):
    """Sees the calls that reveal structure; everything else passes straight through.

    ``on_op(kind)`` is called for attention kernels and activation functions; ``begin_sdpa`` /
    ``end_sdpa(op, output)`` bracket each ``scaled_dot_product_attention`` call;
    ``log_softmax(input shape)`` / ``log_softmax(None)`` bracket log-softmax and cross-entropy calls
    (what they save of the input's shape are log-probabilities); ``elementwise(func, args, kwargs,
    output)`` reports each call of a function in ``elementwise_ops``; ``exact(True)`` /
    ``exact(False)`` bracket the ops of ``_EXACT``, whose saved tensors must stay exact; ``key(t)``
    identifies SDPA's q, k and v (``identity.Storages.view_key``).
    """

    def __init__(
        self,
        on_op: Callable[[str], None],
        begin_sdpa: Callable[[AttentionOp], None],
        end_sdpa: Callable[[AttentionOp, Any], None],
        log_softmax: Callable[[tuple[int, ...] | None], None],
        elementwise: Callable[[Callable, tuple, dict, Any], None],
        exact: Callable[[bool], None],
        key: Callable[[torch.Tensor], ViewKey],
        elementwise_ops: frozenset[Callable] = frozenset(),
    ) -> None:
        super().__init__()
        self._on_op = on_op
        self._begin_sdpa = begin_sdpa
        self._end_sdpa = end_sdpa
        self._log_softmax = log_softmax
        self._elementwise = elementwise
        self._elementwise_ops = elementwise_ops
        self._exact = exact
        self._key = key

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self._on_op(ATTENTION)
            q, k, v = _sdpa_qkv(args, kwargs)
            key = self._key
            op = AttentionOp(key(q), key(k), key(v), q.numel() // 8)
            self._begin_sdpa(op)
            out = None
            try:
                out = func(*args, **kwargs)
            finally:
                self._end_sdpa(op, out)
            return out
        if func in _LOG_SOFTMAX:
            x = args[0] if args else kwargs.get("input")
            self._log_softmax(tuple(x.shape) if isinstance(x, torch.Tensor) else None)
            try:
                return func(*args, **kwargs)
            finally:
                self._log_softmax(None)
        if func in _EXACT:
            self._exact(True)
            try:
                return func(*args, **kwargs)
            finally:
                self._exact(False)
        if func in _SOFTMAX:
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, torch.Tensor) and x.dim() >= 4:
                self._on_op(ATTENTION)
        elif func in ACTIVATIONS:
            self._on_op(ACTIVATION)
        if func in self._elementwise_ops:
            out = func(*args, **kwargs)
            self._elementwise(func, args, kwargs, out)
            return out
        return func(*args, **kwargs)


def _sdpa_qkv(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("query", "key", "value")
    values = list(args[:3]) + [kwargs[n] for n in names[len(args[:3]) :]]
    return values[0], values[1], values[2]
