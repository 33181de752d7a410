"""Hook mode: per-module ``saved_tensors_hooks``, innermost module wins, and what a forward's saves become.

Every module gets a forward pre-hook that pushes a ``saved_tensors_hooks`` context whose pack
function knows the module, and a forward hook (``always_call``) that pops it, so a tensor saved
for backward is packed by the innermost module running. Pack turns it into a ``SavedTensor``
(stored as ``span.decide`` says for its class, module and bits); unpack dequantizes it.

Left alone: ``nn.Parameter``s and buffers (returned as they are, not counted), and nothing is
pushed while another ``saved_tensors_hooks`` owner is innermost (a checkpointed region or its
recomputation, ``save_on_cpu``), during backward, or with grad disabled.

The first forward(s) (until ``stop_tracing``) are traced: their saved tensors are held as they are
until the outermost forward returns, then the model is classified (``classify.py``) and the held
tensors are stored. Later forwards store at pack time and, when the engine asks for it, are recorded
as a plan (``plan.py``) that later forwards replay without these hooks.

``OpWatcher`` (a ``TorchFunctionMode`` active during forwards) adds what only the op knows:

* SDPA: q/k are ``attn_core``, v and the output ``attn_value``; its other saved tensors (the
  log-sum-exp) are softmax statistics, kept exact.
* log-softmax / cross-entropy: the saved log-probabilities are stored as probabilities.
* elementwise ops (``recipe.ELEMENTWISE``): a saved tensor that elementwise ops computed from
  tensors stored in this forward (and parameters) is kept as a recipe over them (``DerivedTensor``,
  0 bytes) when ``recompute`` is on (``derive.py``).

A tensor saved by several ops (or as several views of one memory span) is stored once, at the
largest bit-width any of its savers asks for. Spans are identified by ``identity.Storages``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .classes import LayerClass
from .classify import Classifier, Structure
from .derive import Derivations
from .identity import SpanTable, Storages
from .plan import build_plan
from .span import ForwardPlan
from .storage import DerivedTensor, Ledger, QuantSpec, SavedTensor, unpack_saved
from .trace import AttentionOp, OpWatcher, Trace

logger = logging.getLogger("agoq_ds.activation")

BitsFn = Callable[[str, str], int]
"""(module name, class) -> bits (16: keep)."""
SavedFn = Callable[..., None]
"""Observer of every finalised tensor: ``(tensor, class, module name, quantizable)``, or
``(None, class, module name, False, elements)`` for a recomputed one."""
ForwardEnd = Callable[[ForwardPlan | None, frozenset[int], bool], None]
"""Called when an outermost recorded forward returns: ``(its plan or None, ids of the model's
parameters and buffers, merge into the previous forward)``."""


def top_hooks() -> tuple | None:
    """The innermost ``saved_tensors_hooks`` pair, or ``None`` when none is active."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, TypeError):  # private API; without it, assume nobody else is innermost
        return None


def in_backward() -> bool:
    """True while autograd runs a backward on this thread."""
    return torch._C._current_graph_task_id() != -1


class _Frame:
    __slots__ = ("ctx", "module", "traced")

    def __init__(self, module: int, traced: bool, ctx: Any) -> None:
        self.module, self.traced, self.ctx = module, traced, ctx


class Recorder:
    """The hook mode of one model (see module docstring). ``seed_of(span index)`` gives a span's
    stochastic-rounding seed in the current forward; ``begin()`` / ``end(plan, kept, merge)`` bracket
    each outermost forward it runs."""

    def __init__(
        self,
        model: nn.Module,
        ledger: Ledger,
        bits: BitsFn,
        spec: QuantSpec,
        min_numel: int,
        seed_of: Callable[[int], int],
        begin: Callable[[], None],
        end: ForwardEnd,
        on_saved: SavedFn | None = None,
        recompute: bool = True,
    ) -> None:
        self.model, self.ledger, self.bits, self.spec, self.min_numel = model, ledger, bits, spec, min_numel
        self.seed_of, self._begin, self._end = seed_of, begin, end
        self.on_saved = on_saved
        self.classifier = Classifier(model)
        """Module names, kinds and the classification logic."""
        self.root = self.classifier.index[id(model)]
        """Index of the model itself."""
        self.structure = Structure({})
        """The current classification (empty until the first traced forward returns)."""
        self.storages = Storages()
        """Identity of the memory the current forward saved (cleared at its end)."""
        self.trace: Trace | None = Trace(self.storages)
        """Calls recorded so far while tracing; ``None`` once tracing stopped."""
        self.enabled = True
        """False: pack nothing (hooks stay registered)."""
        self.calibrating = False
        """True: store everything unquantized (bits 16) while still classifying and counting."""
        self.nonfinite_sources: set[tuple[int, str, int]] = set()
        """(module index, class, elements) of spans found holding NaN/Inf while tracing: kept
        unquantized in every later forward. Only traced forwards check (the check reads the device);
        later a non-finite value in a quantized span reads back as NaN in its group, never as a
        finite number."""
        self.recording = False
        """Set by the engine before an outermost forward: record its plan."""
        self.derivations = Derivations(self.storages, self.ledger) if recompute else None
        """Saved tensors computed elementwise from stored ones, kept as recipes (``recompute``)."""
        self._spans = SpanTable()
        self._stack: list[_Frame] = []
        self._depth = 0
        self._pending: list[Any] = []
        self._sdpa: list[AttentionOp] = []
        self._kept: dict[int, torch.Tensor] = {}
        self._span_count = 0
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
        self._records: list[tuple] | None = None
        watch = self.derivations.on_elementwise if self.derivations is not None else None
        self._watcher = OpWatcher(
            self._on_op,
            self._sdpa.append,
            self._end_sdpa,
            self._set_log_softmax,
            functools.partial(self._on_elementwise, watch),
            self._set_exact,
            self.storages.view_key,
            self.derivations.ops if self.derivations is not None else frozenset(),
        )
        self._packers = [functools.partial(self.pack, i, None) for i in range(len(self.classifier.names))]
        self._module_handles: list[Any] = []

    @property
    def running(self) -> bool:
        """True inside a module call this recorder runs (a nested call of the root runs inside it)."""
        return bool(self._stack)

    @property
    def hooks_installed(self) -> bool:
        """Whether the per-module hooks are registered (only while forwards run in hook mode)."""
        return bool(self._module_handles)

    # --- installation ------------------------------------------------------------------------------

    def install_module_hooks(self) -> None:
        """Register every module's pre/post hooks but the root's (the engine calls ``pre``/``post``)."""
        if self._module_handles:
            return
        for module in self.model.modules():
            i = self.classifier.index[id(module)]
            if i == self.root:
                continue
            pre = module.register_forward_pre_hook(functools.partial(self.pre, i), with_kwargs=True)
            post = module.register_forward_hook(functools.partial(self.post, i), with_kwargs=True, always_call=True)
            self._module_handles += (pre, post)

    def remove_module_hooks(self) -> None:
        """Remove the per-module hooks."""
        for h in self._module_handles:
            h.remove()
        self._module_handles.clear()

    def scoped(self, fn: Callable, module: int = 0) -> Callable:
        """``fn`` run as if it were the forward of module ``module`` (default: the root)."""

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            self.install_module_hooks()
            if self._depth == 0:
                self._scoped_outermost = True
            self.pre(module, None, args, kwargs)
            result = None
            try:
                result = fn(*args, **kwargs)
            finally:
                self.post(module, None, args, kwargs, result)
            return result

        run.__wrapped_by_agoq__ = fn  # type: ignore[attr-defined]
        return run

    def stop_tracing(self) -> None:
        """Fix the classification learnt so far; later forwards store at pack time."""
        if self.trace is not None and self.trace.calls:
            self.structure = self.classifier.classify(self.trace)
            self.trace = None

    # --- module hooks --------------------------------------------------------------------------

    def pre(self, i: int, module: nn.Module | None, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of module ``i``: push its pack hooks."""
        traced = self.enabled and torch.is_grad_enabled() and not in_backward()
        ctx = None
        if traced:
            if self._depth == 0:
                self._begin_forward()
            self._depth += 1
            if self.trace is not None:
                self.trace.enter(i, args, kwargs)
            if self._checkpoint_waiting:
                self._attribute_checkpoint_inputs(i)
            top = top_hooks()
            # Compiled agoq's graph-module hooks (``compiled.py``) leave eager code to this recorder.
            if top is None or top[1] is unpack_saved or getattr(top[1], "agoq_compiled", False):
                ctx = torch.autograd.graph.saved_tensors_hooks(self._packers[i], unpack_saved)
                ctx.__enter__()
            elif self._depth == 1 and not self._warned_foreign:
                self._warned_foreign = True
                self._records = None  # another owner packs some tensors: nothing to replay
                logger.warning(
                    "agoq: another saved_tensors_hooks owner is active around the model forward; "
                    "activations inside it are left to that owner (not quantized)"
                )
        self._stack.append(_Frame(i, traced, ctx))

    def post(self, i: int, module: nn.Module | None, args: tuple, kwargs: dict, output: Any) -> None:
        """Forward hook of module ``i``: pop its pack hooks."""
        if not self._stack:
            return
        frame = self._stack.pop()
        if frame.ctx is not None:
            frame.ctx.__exit__(None, None, None)
        if frame.traced:
            if self.trace is not None:
                self.trace.exit(output)
            self._depth -= 1
            if self._depth == 0:
                self._end_forward()

    def _begin_forward(self) -> None:
        # By identity (held for the forward): a stale address or id could match an activation.
        self._kept = {id(x): x for x in (*self.model.parameters(), *self.model.buffers())}
        self._records = [] if self.recording and self.trace is None else None
        self._clear_forward()
        self._watcher.__enter__()
        self._begin()

    def _end_forward(self) -> None:
        self._watcher.__exit__(None, None, None)
        kept, self._kept = self._kept, {}
        if self.trace is not None:
            self.trace.reset_open()
            if self.trace.calls:
                self.structure = self.classifier.classify(self.trace)
        pending, self._pending = self._pending, []
        for holder in pending:
            if not holder.final:
                self._finalize(holder)
        records, self._records = self._records, None
        plan = None
        if records is not None and self.recording and not self._scoped_outermost:
            plan = build_plan(records)
        self.recording = False
        self._clear_forward()
        # A function run after the model's forward (a pipeline loss) belongs to that micro-batch.
        merge, self._scoped_outermost = self._scoped_outermost, False
        if not merge:
            self._span_count = 0
            self._span_index.clear()
        self._end(plan, frozenset(kept), merge)

    def _clear_forward(self) -> None:
        self._spans.clear()
        self.storages.clear()
        if self.derivations is not None:
            self.derivations.clear()

    # --- pack ------------------------------------------------------------------------------------

    def pack(self, module: int, cls: str | None, t: torch.Tensor) -> Any:
        """Pack hook of module ``module`` (``cls``: a class the saver knows, e.g. checkpoint inputs)."""
        packed = self._pack_one(module, cls, t)
        if self._records is not None:
            self._records.append((tuple(t.shape), t.stride(), t.dtype, None if packed is t else packed))
        return packed

    def _pack_one(self, module: int, cls: str | None, t: torch.Tensor) -> Any:
        if t.layout != torch.strided or self._is_parameter_or_buffer(t):
            return t
        key = self.storages.span_key(t)
        holder = self._spans.get(key)
        if holder is None and self.derivations is not None and not self._sdpa and not self._exact_depth:
            derived = self.derivations.derive(key, t)
            if derived is not None and self._accept_derived(derived, module, cls):
                self._spans.put(key, derived)
                return derived.view(t)
        new = holder is None
        if holder is None:
            holder = SavedTensor(t, self.ledger, self.min_numel)
            self._number(holder)
            holder.log_space = self._log_softmax_shape == tuple(t.shape) and t.is_floating_point()
            self._spans.put(key, holder)
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

    def _accept_derived(self, derived: DerivedTensor, module: int, cls: str | None) -> bool:
        """Keep ``derived`` as a recipe unless a source was stored coarser than this consumer wants."""
        leaves = derived.stored_leaves()
        final_bits = [leaf.bits for leaf in leaves if leaf.final]
        if self.trace is None and final_bits and min(final_bits) < self._bits_for(module, cls):
            return False
        self._number(derived)
        derived.count_source_reads()
        derived.requests.append((module, cls))
        for leaf in leaves:
            if not leaf.final:
                leaf.requests.append((module, cls))
        if cls is None and self.trace is not None:
            self._pending.append(derived)
        else:
            self._finalize(derived)
        return True

    def _is_parameter_or_buffer(self, t: torch.Tensor) -> bool:
        """A parameter or buffer of the model, or a view of one (Linear saves ``weight.t()``)."""
        for x in (t, t._base):
            if x is not None and (isinstance(x, nn.Parameter) or self._kept.get(id(x)) is x):
                return True
        return False

    def _class(self, module: int, cls: str | None) -> str:
        return cls if cls is not None else self.structure.class_of(module)

    def _bits_for(self, module: int, cls: str | None) -> int:
        if self.calibrating:
            return 16
        return self.bits(self.classifier.names[module], self._class(module, cls))

    def _request(self, holder: Any, t: torch.Tensor, module: int, cls: str | None) -> None:
        """Another consumer saved the same data: it gets the larger of the two bit-widths."""
        holder.requests.append((module, cls))
        if holder.final and (cls is not None or self.trace is None):
            holder.upgrade(t, self._bits_for(module, cls), self.spec, self._seed_for(holder))

    def _finalize(self, holder: Any, statistic: bool = False) -> None:
        module, cls = holder.requests[0]
        source = (module, self._class(module, cls), holder.numel)
        holder.finalize(
            source[1],
            self.classifier.names[module],
            [self._bits_for(m, c) for m, c in holder.requests],
            statistic or source in self.nonfinite_sources,
            self.spec,
            self._seed_for(holder),
            self.on_saved,
            check_finite=self.trace is not None,
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
        self._span_index[id(holder)] = self._span_count
        self._span_count += 1

    def _seed_for(self, holder: Any) -> int:
        """Stochastic-rounding seed of ``holder``: (configured seed, forward number, creation order)."""
        return self.seed_of(self._span_index.get(id(holder), -1))

    # --- what the op watcher reports ------------------------------------------------------------

    def _on_op(self, kind: str) -> None:
        # Ops under an untraced frame (a no-grad checkpoint forward) belong to no traced scope.
        if self.trace is not None and self._stack and self._stack[-1].traced:
            self.trace.op(kind)

    def _on_elementwise(self, watch: Callable | None, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        if watch is not None and self._depth and not self._sdpa and not self._exact_depth:
            watch(func, args, kwargs, out, self._spans)

    def _set_log_softmax(self, shape: tuple[int, ...] | None) -> None:
        self._log_softmax_shape = shape

    def _set_exact(self, entering: bool) -> None:
        self._exact_depth += 1 if entering else -1

    def _end_sdpa(self, op: AttentionOp, output: Any) -> None:
        self._sdpa.pop()
        out_key = self.storages.view_key(output) if isinstance(output, torch.Tensor) else None
        for holder, t, module, new in op.packed:
            k = self.storages.view_key(t)
            statistic = False
            if k in (op.q, op.k):
                cls = LayerClass.ATTN_CORE.value
            elif k == op.v or k == out_key:
                cls = LayerClass.ATTN_VALUE.value
            else:  # log-sum-exp and the like: exponentiated in backward, 1/head_dim of q's size
                cls, statistic = LayerClass.ATTN_CORE.value, t.numel() <= op.statistic_numel
            if new:
                holder.requests.append((module, cls))
                self._finalize(holder, statistic=statistic)
            else:
                self._request(holder, t, module, cls)
        op.packed.clear()

    # --- checkpointing -------------------------------------------------------------------------

    @contextmanager
    def checkpoint_inputs(self):
        """Context in which tensors saved (by a checkpoint function: the block inputs) are packed as
        ``checkpoint_input`` of the innermost running module; a no-op where agoq must not pack."""
        top = top_hooks()
        usable = (
            self.enabled
            and self._depth > 0
            and torch.is_grad_enabled()
            and not in_backward()
            and (top is None or top[1] is unpack_saved)
        )
        if not usable:
            yield
            return
        module = self._stack[-1].module if self._stack else 0
        pack = functools.partial(self.pack, module, LayerClass.CHECKPOINT_INPUT.value)
        outer, self._checkpoint_waiting = self._checkpoint_waiting, []
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack_saved):
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
