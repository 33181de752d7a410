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
* elementwise ops (``recipe.ELEMENTWISE``): a saved tensor that elementwise ops computed from
  tensors stored in this forward (and parameters) is kept as a recipe over them (``DerivedTensor``,
  0 bytes) when ``recompute`` is on: activation outputs, an RMSNorm's normalised value and output,
  the MLP's gating product (see ``recipe.py``).

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
from torch.multiprocessing.reductions import StorageWeakRef

from ..seeding import mix_seed
from .classes import LOSS_HEAD_MIN_BITS, LayerClass
from .classify import Classifier, Structure
from .plan import PlanCache, Replay, build_plan, plan_key
from .recipe import ELEMENTWISE, Leaf, Recipe, bind_parameters, compose
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


def _live_leaves(refs: tuple) -> list[Leaf] | None:
    """The (holder, shape, strides) of a recipe's sources, or ``None`` if one was freed."""
    leaves: list[Leaf] = []
    for ref, shape, stride in refs:
        holder = ref()
        if holder is None:
            return None
        leaves.append((holder, shape, stride))
    return leaves


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
        """Keep tensors computed elementwise from stored ones as recipes over them (``DerivedTensor``)."""
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
            self._on_op,
            self._sdpa.append,
            self._end_sdpa,
            self._set_log_softmax,
            self._on_elementwise,
            self._set_exact,
            ELEMENTWISE if recompute else frozenset(),
        )
        self.nonfinite_sources: set[tuple[int, str, int]] = set()
        """(module index, class, elements) of spans found holding NaN/Inf while tracing: kept
        unquantized in every later forward. Only traced forwards check (the check reads the device);
        later a non-finite value in a quantized span reads back as NaN in its group, never as a
        finite number."""
        self.replay = True
        """Replay recorded per-forward plans (``plan.py``) instead of running the per-module hooks."""
        self.plans = PlanCache()
        """Recorded plans of this model."""
        self.replayed = 0
        """Forwards that followed a recorded plan to the end."""
        self._replay: Replay | None = None
        self._replay_ctx: Any = None
        self._kept_ids: frozenset[int] = frozenset()
        self._recording: list[tuple] | None = None
        self._plan_key: tuple | None = None
        self._root_modes: list[int] = []
        self._root = self.classifier.index[id(model)]
        self._unpack_fn = self._unpack
        self._packers = [functools.partial(self._pack, i, None) for i in range(len(self.classifier.names))]
        self._handles: list[Any] = []
        self._module_handles: list[Any] = []

    # --- installation ------------------------------------------------------------------------------

    def install(self) -> None:
        """Register the root module's forward pre/post hooks; the other modules get theirs while a
        forward is traced or recorded (a replayed forward runs without them)."""
        if self._handles:
            return
        self._handles.append(self.model.register_forward_pre_hook(self._root_pre, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._root_post, with_kwargs=True, always_call=True))

    def remove(self) -> None:
        """Remove the hooks (tensors already packed stay valid for their backward)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._remove_module_hooks()

    def invalidate_plans(self) -> None:
        """Forget the recorded plans (the bit-widths changed); the next forward is recorded again."""
        self.plans.clear()

    def _install_module_hooks(self) -> None:
        if self._module_handles:
            return
        for module in self.model.modules():
            i = self.classifier.index[id(module)]
            if i == self._root:
                continue
            pre = module.register_forward_pre_hook(functools.partial(self._pre, i), with_kwargs=True)
            post = module.register_forward_hook(functools.partial(self._post, i), with_kwargs=True, always_call=True)
            self._module_handles += (pre, post)

    def _remove_module_hooks(self) -> None:
        for h in self._module_handles:
            h.remove()
        self._module_handles.clear()

    def scoped(self, fn: Callable, module: int = 0) -> Callable:
        """``fn`` run as if it were the forward of module ``module`` (default: the root), so what it
        saves is packed too, e.g. a ``PipelineModule``'s loss function, which the pipeline engine
        calls outside the module's forward."""

        # A scoped function is a second outermost scope per micro-batch: it runs with the hooks.
        self.replay = False
        self.plans.clear()

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            self._install_module_hooks()
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

    # --- root hooks: replay a plan, or run the module hooks ---------------------------------------

    _NONE, _HOOKS, _REPLAY = 0, 1, 2

    def _root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mode = self._root_mode(module, args, kwargs)
        self._root_modes.append(mode)
        if mode == self._REPLAY:
            self._remove_module_hooks()
            assert self._replay is not None
            _ACTIVE.engine = self
            ctx = torch.autograd.graph.saved_tensors_hooks(self._replay.pack, self._unpack_fn)
            ctx.__enter__()
            self._replay_ctx = ctx
        elif mode == self._HOOKS:
            self._install_module_hooks()
            self._pre(self._root, module, args, kwargs)

    def _root_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        mode = self._root_modes.pop() if self._root_modes else self._NONE
        if mode == self._REPLAY:
            self._replay_ctx.__exit__(None, None, None)
            replay, self._replay, self._replay_ctx = self._replay, None, None
            _ACTIVE.engine = None
            assert replay is not None
            if replay.finish():
                self.replayed += 1
            else:
                self.plans.drop(replay.key)
            self.ledger.end_forward()
            self.forwards += 1
        elif mode == self._HOOKS:
            self._post(self._root, module, args, kwargs, output)

    def _root_mode(self, module: nn.Module, args: tuple, kwargs: dict) -> int:
        """How this call of the root runs: nested in a forward already running, not packing at all,
        replaying a plan (setting ``_replay``), or with the module hooks (recording a plan under
        ``_plan_key`` when one can be recorded)."""
        if self._replay is not None:
            return self._NONE  # nested: the running replay's hooks are innermost
        if self._stack:
            return self._HOOKS
        if not (self.enabled and torch.is_grad_enabled() and not _in_backward()):
            return self._NONE
        self._plan_key = None
        if self.replay and self.trace is None and not self.calibrating and self.on_saved is None:
            if _top_hooks() is None:
                key = plan_key(module, args, kwargs)
                plan = self.plans.get(key)
                if plan is not None:
                    self._replay = Replay(plan, key, self.ledger, self.spec, self._plan_seed, self._kept_ids)
                    return self._REPLAY
                self._plan_key = key
        return self._HOOKS

    def _plan_seed(self, span: int) -> int:
        """Stochastic-rounding seed of the ``span``-th span of a replayed forward (as ``_seed_for``)."""
        return mix_seed(self.seed, self.forwards, span)

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
                self._recording = None  # another owner packs some tensors: nothing to replay
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
        self._recording = [] if self._plan_key is not None and self.trace is None else None
        self._cache.clear()
        self._derivable.clear()
        self._watcher.__enter__()
        _ACTIVE.engine = self

    def _end_forward(self) -> None:
        self._watcher.__exit__(None, None, None)
        kept, self._kept = self._kept, {}
        _ACTIVE.engine = None
        if self.trace is not None:
            self.trace.reset_open()
            if self.trace.calls:
                self.structure = self.classifier.classify(self.trace)
        pending, self._pending = self._pending, []
        for holder in pending:
            if not holder.final:
                self._finalize(holder)
        recording, self._recording = self._recording, None
        if recording is not None and self._plan_key is not None and not self._scoped_outermost:
            plan = build_plan(recording)
            if plan is not None:
                self.plans.put(self._plan_key, plan)
                self._kept_ids = frozenset(kept)
        self._plan_key = None
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
        packed = self._pack_one(module, cls, t)
        if self._recording is not None:
            self._recording.append((tuple(t.shape), t.stride(), t.dtype, None if packed is t else packed))
        return packed

    def _pack_one(self, module: int, cls: str | None, t: torch.Tensor) -> Any:
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

    def _on_elementwise(self, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        """Remember how ``out = func(*args, **kwargs)`` can be rebuilt from stored tensors, so a later
        save of ``out`` can be a recipe."""
        if not (self._traced_depth and isinstance(out, torch.Tensor)) or self._sdpa or self._exact_depth:
            return
        if out.layout != torch.strided or not out.is_floating_point():
            return
        composed = compose(func, args, kwargs, out, self._derivation_of)
        if composed is None:
            return
        recipe, leaves = composed
        bound = bind_parameters(recipe)  # ZeRO-3 parameters: copied now, while they are gathered
        if bound is None:
            return
        refs = tuple((weakref.ref(holder), shape, stride) for holder, shape, stride in leaves)
        # The output's storage, not the tensor, must be alive: ZeRO-3 hands the next op an alias of it.
        self._derivable[dedup_key(out)] = (recipe, refs, StorageWeakRef(out.untyped_storage()), bound)

    def _derivation_of(self, t: torch.Tensor) -> tuple[Recipe, list[Leaf]] | Leaf | None:
        """``t``'s holder in this forward, or the recipe of ``t`` if it was not saved but can be rebuilt."""
        key = dedup_key(t)
        holder = self._cache.get(key)
        if holder is not None:
            return holder, tuple(t.shape), t.stride()
        entry = self._derivable.get(key)
        if entry is None or entry[2].expired():
            return None
        leaves = _live_leaves(entry[1])
        return (entry[0], leaves) if leaves is not None else None

    def _derive(self, key: tuple, t: torch.Tensor, module: int, cls: str | None) -> DerivedTensor | None:
        recipe, refs, out_storage, bound = self._derivable[key]
        sources = _live_leaves(refs)
        if out_storage.expired() or sources is None:
            return None
        derived = DerivedTensor(tuple(SavedView(*leaf) for leaf in sources), recipe, t, self.ledger, bound)
        leaves = derived.stored_leaves()
        final_bits = [leaf.bits for leaf in leaves if leaf.final]
        if self.trace is None and final_bits and min(final_bits) < self._bits_for(module, cls):
            return None  # a source was stored coarser than this consumer wants
        self._number(derived)
        derived.requests.append((module, cls))
        self._cache.put(key, t, derived)
        for leaf in leaves:
            if not leaf.final:
                leaf.requests.append((module, cls))
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
        if self._replay is not None:
            yield  # the replay's hooks are innermost and pack the block inputs as planned
            return
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
