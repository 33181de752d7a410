"""The pack/unpack machinery: per-module ``saved_tensors_hooks``, innermost module wins.

Every module gets a forward pre-hook that pushes a ``saved_tensors_hooks`` context whose pack
function knows the module, and a forward hook (``always_call``) that pops it, so a tensor saved
for backward is packed by the innermost module running. Pack turns it into a ``SavedTensor``
(quantized at the bits the policy gives its class and module); unpack dequantizes it.

Left alone: ``nn.Parameter``s and buffers (returned as they are, not counted), and nothing is
pushed while another ``saved_tensors_hooks`` owner is innermost (a checkpointed region or its
recomputation, ``save_on_cpu``), during backward, or with grad disabled.

The first forward(s) after ``install`` (until ``stop_tracing``) are traced: their saved tensors
are held as they are until the outermost forward returns, then the model is classified
(``classify.py``) and the held tensors are quantized. Later forwards quantize at pack time.

``OpWatcher`` (a ``TorchFunctionMode`` active during forwards) adds what only the op knows:

* SDPA: q/k are ``attn_core``, v and the output ``attn_value``; its other saved tensors (the
  log-sum-exp) are softmax statistics, kept exact.
* log-softmax / cross-entropy: the saved log-probabilities are stored as probabilities.
* elementwise activations: a saved activation output whose input the activation saved itself is
  kept as a recipe over that input (``DerivedTensor``, 0 bytes) when ``recompute`` is on.

A tensor saved by several ops (or as several views of one memory span) is stored once, at the
largest bit-width any of its savers asks for.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..seeding import mix_seed
from .classes import LOSS_HEAD_MIN_BITS, LayerClass
from .classify import Classifier, Structure
from .storage import DedupCache, DerivedTensor, Ledger, QuantSpec, SavedTensor, SavedView, dedup_key
from .trace import AttentionOp, OpWatcher, Trace, tensor_key

logger = logging.getLogger("agoq_ds.activation")

BitsFn = Callable[[str, str], int]
"""(module name, class) -> bits (16: keep)."""
SavedFn = Callable[..., None]
"""Observer of every finalised tensor: ``(tensor, class, module name, quantizable)``, or
``(None, class, module name, False, elements)`` for a recomputed one."""

_ACTIVE = threading.local()


def active_engine() -> PackEngine | None:
    """The engine whose model is running a forward on this thread (for the module-level
    checkpoint function), if any."""
    return getattr(_ACTIVE, "engine", None)


def _top_hooks() -> tuple | None:
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, TypeError):  # private API; without it, assume nobody else is innermost
        return None


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class _Frame:
    __slots__ = ("ctx", "module", "traced")

    def __init__(self, module: int, traced: bool, ctx: Any) -> None:
        self.module, self.traced, self.ctx = module, traced, ctx


class PackEngine:
    """Installs the per-module hooks on one model and keeps what they pack (see module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        bits: BitsFn,
        spec: QuantSpec,
        min_numel: int,
        seed: int = 0,
        on_saved: SavedFn | None = None,
        recompute: bool = True,
    ) -> None:
        self.model = model
        self.classifier = Classifier(model)
        """Module names, kinds and the classification logic."""
        self.structure = Structure({})
        """The current classification (empty until the first traced forward returns)."""
        self.trace: Trace | None = Trace()
        """Calls recorded so far while tracing; ``None`` once tracing stopped."""
        self.ledger = Ledger()
        """Exact byte accounting."""
        self.bits = bits
        self.spec = spec
        self.min_numel = min_numel
        self.seed = seed
        self.on_saved = on_saved
        self.enabled = True
        """False: pack nothing (hooks stay registered)."""
        self.recompute = recompute
        """Keep activation-function outputs as recipes over their stored inputs (``DerivedTensor``)."""
        self.calibrating = False
        """True: store everything unquantized (bits 16) while still classifying and counting."""
        self.forwards = 0
        """Outermost forwards run with quantization hooks."""
        self._cache = DedupCache()
        self._stack: list[_Frame] = []
        self._traced_depth = 0
        self._pending: list[SavedTensor] = []
        self._sdpa: list[AttentionOp] = []
        self._kept: dict[int, torch.Tensor] = {}
        self._spans = 0
        self._span_index: dict[int, int] = {}
        """Creation order, within the current forward, of each span saved (by holder id): with the
        forward number it makes the span's stochastic-rounding seed, independent of the order in which
        spans are finalized (a traced forward finalizes later than the forwards after it)."""
        self._checkpoint_waiting: list[SavedTensor] | None = None
        self._scoped_outermost = False
        self._warned_foreign = False
        self._log_softmax_shape: tuple[int, ...] | None = None
        self._exact_depth = 0
        """> 0 inside an op whose backward needs its saved tensors bit-exact (``trace._EXACT``)."""
        self._derivable: dict[tuple, tuple] = {}
        self._watcher = OpWatcher(
            self._on_op, self._sdpa.append, self._end_sdpa, self._set_log_softmax, self._on_activation, self._set_exact
        )
        self.nonfinite_sources: set[tuple[int, str, int]] = set()
        """(module index, class, elements) of spans found holding NaN/Inf while tracing: kept
        unquantized in every later forward. Only traced forwards check (the check reads the device);
        later a non-finite value in a quantized span reads back as NaN in its group, never as a
        finite number."""
        self._unpack_fn = self._unpack
        self._packers = [functools.partial(self._pack, i, None) for i in range(len(self.classifier.names))]
        self._handles: list[Any] = []

    # --- installation ------------------------------------------------------------------------------

    def install(self) -> None:
        """Register the forward pre/post hooks on every module of the model."""
        if self._handles:
            return
        for module in self.model.modules():
            i = self.classifier.index[id(module)]
            self._handles.append(module.register_forward_pre_hook(functools.partial(self._pre, i), with_kwargs=True))
            self._handles.append(
                module.register_forward_hook(functools.partial(self._post, i), with_kwargs=True, always_call=True)
            )

    def remove(self) -> None:
        """Remove the hooks (tensors already packed stay valid for their backward)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def scoped(self, fn: Callable, module: int = 0) -> Callable:
        """``fn`` run as if it were the forward of module ``module`` (default: the root), so what it
        saves is packed too, e.g. a ``PipelineModule``'s loss function, which the pipeline engine
        calls outside the module's forward."""

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            if self._traced_depth == 0:
                self._scoped_outermost = True
            self._pre(module, None, args, kwargs)
            result = None
            try:
                result = fn(*args, **kwargs)
            finally:
                self._post(module, None, args, kwargs, result)
            return result

        run.__wrapped_by_agoq__ = fn  # type: ignore[attr-defined]
        return run

    def stop_tracing(self) -> None:
        """Fix the classification learnt so far; later forwards quantize at pack time."""
        if self.trace is not None and self.trace.calls:
            self.structure = self.classifier.classify(self.trace)
            self.trace = None

    # --- module hooks --------------------------------------------------------------------------

    def _pre(self, i: int, module: nn.Module | None, args: tuple, kwargs: dict) -> None:
        traced = self.enabled and torch.is_grad_enabled() and not _in_backward()
        ctx = None
        if traced:
            if self._traced_depth == 0:
                self._begin_forward()
            self._traced_depth += 1
            if self.trace is not None:
                self.trace.enter(i, args, kwargs)
            if self._checkpoint_waiting:
                self._attribute_checkpoint_inputs(i)
            top = _top_hooks()
            if top is None or top[1] is self._unpack_fn:
                ctx = torch.autograd.graph.saved_tensors_hooks(self._packers[i], self._unpack_fn)
                ctx.__enter__()
            elif self._traced_depth == 1 and not self._warned_foreign:
                self._warned_foreign = True
                logger.warning(
                    "agoq: another saved_tensors_hooks owner is active around the model forward; "
                    "activations inside it are left to that owner (not quantized)"
                )
        self._stack.append(_Frame(i, traced, ctx))

    def _post(self, i: int, module: nn.Module | None, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._stack:
            return
        frame = self._stack.pop()
        if frame.ctx is not None:
            frame.ctx.__exit__(None, None, None)
        if frame.traced:
            if self.trace is not None:
                self.trace.exit(output)
            self._traced_depth -= 1
            if self._traced_depth == 0:
                self._end_forward()

    def _begin_forward(self) -> None:
        # By identity (held for the forward): a stale address or id could match an activation.
        self._kept = {id(x): x for x in (*self.model.parameters(), *self.model.buffers())}
        self._cache.clear()
        self._derivable.clear()
        self._watcher.__enter__()
        _ACTIVE.engine = self

    def _end_forward(self) -> None:
        self._watcher.__exit__(None, None, None)
        self._kept = {}
        _ACTIVE.engine = None
        if self.trace is not None:
            self.trace.reset_open()
            if self.trace.calls:
                self.structure = self.classifier.classify(self.trace)
        pending, self._pending = self._pending, []
        for holder in pending:
            if not holder.final:
                self._finalize(holder)
        self._cache.clear()
        self._derivable.clear()
        if self._scoped_outermost:
            # A function run after the model's forward (a pipeline loss) belongs to that micro-batch.
            self._scoped_outermost = False
            self.ledger.end_forward(merge=True)
        else:
            self.ledger.end_forward()
            self.forwards += 1
            self._spans = 0
            self._span_index.clear()

    # --- pack / unpack -------------------------------------------------------------------------

    def _pack(self, module: int, cls: str | None, t: torch.Tensor) -> Any:
        if t.layout != torch.strided or self._is_parameter_or_buffer(t):
            return t
        key = dedup_key(t)
        holder = self._cache.get(key)
        if holder is None and key in self._derivable and not self._sdpa and not self._exact_depth:
            derived = self._derive(key, t, module, cls)
            if derived is not None:
                return derived.view(t)
        new = holder is None
        if holder is None:
            holder = SavedTensor(t, self.ledger, self.min_numel)
            self._number(holder)
            holder.log_space = self._log_softmax_shape == tuple(t.shape) and t.is_floating_point()
            self._cache.put(key, t, holder)
        if self._exact_depth:
            if new:
                holder.quantizable = False
            elif holder.final and holder.q is not None:
                holder.upgrade(t, 16, self.spec, 0)  # back to the exact tensor (``t`` is alive now)
        if self._sdpa:
            self._sdpa[-1].packed.append((holder, t, module, new))
            return holder.view(t)
        if new and self._checkpoint_waiting is not None and cls == LayerClass.CHECKPOINT_INPUT.value:
            holder.requests.append((module, cls))
            self._checkpoint_waiting.append(holder)
        elif new:
            holder.requests.append((module, cls))
            if cls is None and self.trace is not None:
                holder.hold()  # kept unquantized until the traced forward returns
                self._pending.append(holder)
            else:
                self._finalize(holder)
        else:
            self._request(holder, t, module, cls)
        return holder.view(t)

    def _is_parameter_or_buffer(self, t: torch.Tensor) -> bool:
        """A parameter or buffer of the model, or a view of one (Linear saves ``weight.t()``)."""
        for x in (t, t._base):
            if x is not None and (isinstance(x, nn.Parameter) or self._kept.get(id(x)) is x):
                return True
        return False

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        return packed.unpack() if isinstance(packed, SavedView) else packed

    def _class(self, module: int, cls: str | None) -> str:
        return cls if cls is not None else self.structure.class_of(module)

    def _bits_for(self, module: int, cls: str | None) -> int:
        if self.calibrating:
            return 16
        return self.bits(self.classifier.names[module], self._class(module, cls))

    def _request(self, holder: SavedTensor, t: torch.Tensor, module: int, cls: str | None) -> None:
        """Another consumer saved the same data: it gets the larger of the two bit-widths."""
        holder.requests.append((module, cls))
        if holder.final and (cls is not None or self.trace is None):
            holder.upgrade(t, self._bits_for(module, cls), self.spec, self._seed_for(holder))

    def _finalize(self, holder: SavedTensor, force_raw: bool = False) -> None:
        module, cls = holder.requests[0]
        bits = max(self._bits_for(m, c) for m, c in holder.requests)
        if getattr(holder, "log_space", False) and bits < 16:
            bits = max(bits, LOSS_HEAD_MIN_BITS)
        source = (module, self._class(module, cls), holder.numel)
        tracing = self.trace is not None
        holder.finalize(
            source[1],
            self.classifier.names[module],
            bits,
            force_raw or source in self.nonfinite_sources,
            self.spec,
            self._seed_for(holder),
            self.on_saved,
            check_finite=tracing,
        )
        if getattr(holder, "nonfinite", False) and source not in self.nonfinite_sources:
            self.nonfinite_sources.add(source)
            logger.warning(
                "agoq: a tensor saved by %s (%s, %d elements) holds NaN/Inf in a traced forward; "
                "tensors saved there are kept unquantized from now on",
                self.classifier.names[module] or "<model>",
                source[1],
                holder.numel,
            )

    def _number(self, holder: Any) -> None:
        self._span_index[id(holder)] = self._spans
        self._spans += 1

    def _seed_for(self, holder: Any) -> int:
        """Stochastic-rounding seed of ``holder``: (configured seed, forward number, creation order)."""
        return mix_seed(self.seed, self.forwards, self._span_index.get(id(holder), -1))

    # --- attention ops -------------------------------------------------------------------------

    def _on_op(self, kind: str) -> None:
        # Ops under an untraced frame (a no-grad checkpoint forward) belong to no traced scope.
        if self.trace is not None and self._stack and self._stack[-1].traced:
            self.trace.op(kind)

    def _on_activation(self, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        """Remember ``out = func(args[0], ...)`` so a later save of ``out`` can be a recipe."""
        if not (self.recompute and self._traced_depth and args and isinstance(out, torch.Tensor)):
            return
        x = args[0]
        if (
            not isinstance(x, torch.Tensor)
            or out is x
            or kwargs.get("inplace")
            or out.shape != x.shape
            or out.dtype != x.dtype
            or any(isinstance(a, torch.Tensor) for a in (*args[1:], *kwargs.values()))
        ):
            return
        source = self._cache.get(dedup_key(x))  # the activation saved its input: that holder
        if source is None or isinstance(source, DerivedTensor):
            return
        record = (weakref.ref(source), tuple(x.shape), x.stride(), func, args[1:], dict(kwargs), weakref.ref(out))
        self._derivable[dedup_key(out)] = record

    def _derive(self, key: tuple, t: torch.Tensor, module: int, cls: str | None) -> DerivedTensor | None:
        source_ref, shape, stride, func, args, kwargs, out_ref = self._derivable[key]
        source = source_ref()
        if out_ref() is None or source is None:
            return None
        if source.final and self.trace is None and source.bits < self._bits_for(module, cls):
            return None  # the input was stored coarser than this consumer wants
        derived = DerivedTensor(SavedView(source, shape, stride), func, args, kwargs, t, self.ledger)
        self._number(derived)
        derived.requests.append((module, cls))
        self._cache.put(key, t, derived)
        if not source.final:
            source.requests.append((module, cls))
        if cls is None and self.trace is not None:
            self._pending.append(derived)
        else:
            self._finalize(derived)
        return derived

    def _set_log_softmax(self, shape: tuple[int, ...] | None) -> None:
        self._log_softmax_shape = shape

    def _set_exact(self, entering: bool) -> None:
        self._exact_depth += 1 if entering else -1

    def _end_sdpa(self, op: AttentionOp, output: Any) -> None:
        self._sdpa.pop()
        out_key = tensor_key(output) if isinstance(output, torch.Tensor) else None
        for holder, t, module, new in op.packed:
            k = tensor_key(t)
            statistic = False
            if k in (op.q, op.k):
                cls = LayerClass.ATTN_CORE.value
            elif k == op.v or k == out_key:
                cls = LayerClass.ATTN_VALUE.value
            else:  # log-sum-exp and the like: exponentiated in backward, 1/head_dim of q's size
                cls, statistic = LayerClass.ATTN_CORE.value, t.numel() <= op.statistic_numel
            if new:
                holder.requests.append((module, cls))
                self._finalize(holder, force_raw=statistic)
            else:
                self._request(holder, t, module, cls)
        op.packed.clear()

    # --- checkpointing -------------------------------------------------------------------------

    @contextmanager
    def checkpoint_inputs(self):
        """Context in which tensors saved (by a checkpoint function: the block inputs) are packed as
        ``checkpoint_input`` of the innermost running module; a no-op where agoq must not pack."""
        top = _top_hooks()
        usable = (
            self.enabled
            and self._traced_depth > 0
            and torch.is_grad_enabled()
            and not _in_backward()
            and (top is None or top[1] is self._unpack_fn)
        )
        if not usable:
            yield
            return
        module = self._stack[-1].module if self._stack else 0
        pack = functools.partial(self._pack, module, LayerClass.CHECKPOINT_INPUT.value)
        outer, self._checkpoint_waiting = self._checkpoint_waiting, []
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack_fn):
                yield
        finally:
            self._attribute_checkpoint_inputs(None)
            self._checkpoint_waiting = outer

    def _attribute_checkpoint_inputs(self, module: int | None) -> None:
        """Give the block inputs saved by a checkpoint function to the first module that runs in the
        checkpointed function (``None``: keep the caller's), so they count per layer, then store them."""
        waiting, self._checkpoint_waiting = self._checkpoint_waiting or [], []
        for holder in waiting:
            if module is not None:
                holder.requests[0] = (module, holder.requests[0][1])
            self._finalize(holder)
