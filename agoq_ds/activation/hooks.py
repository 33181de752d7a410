"""``PackEngine``: the mode switch of one model's activation packing, and the owner of its ledger.

Two root hooks decide how each outermost forward runs: replaying a recorded plan under one
``saved_tensors_hooks`` (``plan.Replay``: a few comparisons per saved tensor), or in hook mode
(``recorder.Recorder``: per-module hooks, tracing, deduplication, recipes), which records a plan when
one can be replayed later. Nested calls of the root, forwards without grad, in backward or under
another saved-tensor-hooks owner are left to whatever runs around them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..seeding import mix_seed
from .plan import PlanCache, Replay, plan_key
from .recorder import BitsFn, Recorder, SavedFn, in_backward, top_hooks
from .span import ForwardPlan
from .storage import Ledger, QuantSpec, unpack_saved

_ACTIVE = threading.local()
_NONE, _HOOKS, _REPLAY = 0, 1, 2


def active_engine() -> PackEngine | None:
    """The engine whose model is running a forward on this thread (for the module-level
    checkpoint function), if any."""
    return getattr(_ACTIVE, "engine", None)


class PackEngine:
    """Packs what one model saves for backward: replays plans, or records them in hook mode."""

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
        self.model, self.seed = model, seed
        self.ledger = Ledger()
        """Exact byte accounting."""
        self.forwards = 0
        """Outermost forwards run with quantization hooks (with ``seed``, it seeds stochastic rounding)."""
        self.replay = True
        """Replay recorded per-forward plans (``plan.py``) instead of running the per-module hooks."""
        self.plans = PlanCache()
        """Recorded plans of this model."""
        self.replayed = 0
        """Forwards that followed a recorded plan to the end."""
        self.recorder = Recorder(
            model, self.ledger, bits, spec, min_numel, self._seed_of, self._begin, self._end, on_saved, recompute
        )
        """Hook mode (tracing, classification, recording)."""
        self._replay: Replay | None = None
        self._replay_ctx: Any = None
        self._plan_key: tuple | None = None
        self._root_modes: list[int] = []
        self._handles: list[Any] = []

    spec = property(lambda self: self.recorder.spec, doc="How activations are quantized.")
    trace = property(lambda self: self.recorder.trace, doc="The trace while tracing, else ``None``.")
    classifier = property(lambda self: self.recorder.classifier, doc="Module names and kinds.")
    structure = property(lambda self: self.recorder.structure, doc="The current classification.")

    def install(self) -> None:
        """Register the root module's forward pre/post hooks; the other modules get theirs while a
        forward runs in hook mode (a replayed forward runs without them)."""
        if not self._handles:
            self._handles.append(self.model.register_forward_pre_hook(self._root_pre, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._root_post, with_kwargs=True, always_call=True))

    def remove(self) -> None:
        """Remove the hooks (tensors already packed stay valid for their backward)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.recorder.remove_module_hooks()

    def invalidate_plans(self) -> None:
        """Forget the recorded plans (the bit-widths changed); the next forward is recorded again."""
        self.plans.clear()

    def stop_tracing(self) -> None:
        """Fix the classification learnt so far; later forwards store at pack time."""
        self.recorder.stop_tracing()

    def scoped(self, fn: Callable, module: int = 0) -> Callable:
        """``fn`` run as if it were the forward of module ``module`` (default: the root), so what it
        saves is packed too, e.g. a ``PipelineModule``'s loss function, which the pipeline engine
        calls outside the module's forward. A second outermost scope per micro-batch: no replay."""
        self.replay = False
        self.plans.clear()
        return self.recorder.scoped(fn, module)

    @contextmanager
    def checkpoint_inputs(self):
        """Context in which a checkpoint function's saved block inputs are packed as
        ``checkpoint_input`` of the innermost running module (a replay packs them as planned)."""
        if self._replay is not None:
            yield
            return
        with self.recorder.checkpoint_inputs():
            yield

    def _root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mode = self._root_mode(module, args, kwargs)
        self._root_modes.append(mode)
        if mode == _REPLAY:
            self.recorder.remove_module_hooks()
            _ACTIVE.engine = self
            self._replay_ctx = torch.autograd.graph.saved_tensors_hooks(self._replay.pack, unpack_saved)
            self._replay_ctx.__enter__()
        elif mode == _HOOKS:
            self.recorder.install_module_hooks()
            self.recorder.pre(self.recorder.root, module, args, kwargs)

    def _root_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        mode = self._root_modes.pop() if self._root_modes else _NONE
        if mode == _REPLAY:
            self._replay_ctx.__exit__(None, None, None)
            replay, self._replay, self._replay_ctx = self._replay, None, None
            _ACTIVE.engine = None
            if replay.finish():
                self.replayed += 1
            else:
                self.plans.drop(replay.key)
            self.ledger.end_forward()
            self.forwards += 1
        elif mode == _HOOKS:
            self.recorder.post(self.recorder.root, module, args, kwargs, output)

    def _root_mode(self, module: nn.Module, args: tuple, kwargs: dict) -> int:
        """How this call of the root runs: nested in a forward already running, not packing at all,
        replaying a plan (setting ``_replay``), or in hook mode (recording a plan under ``_plan_key``
        when one can be recorded)."""
        recorder = self.recorder
        if self._replay is not None:
            return _NONE  # nested: the running replay's hooks are innermost
        if recorder.running:
            return _HOOKS
        if not (recorder.enabled and torch.is_grad_enabled() and not in_backward()):
            return _NONE
        self._plan_key, recorder.recording = None, False
        if self.replay and recorder.trace is None and not recorder.calibrating and recorder.on_saved is None:
            if top_hooks() is None:
                key = plan_key(module, args, kwargs)
                plan = self.plans.get(key)
                if plan is not None:
                    self._replay = Replay(plan, key, self.ledger, recorder.spec, self._seed_of)
                    return _REPLAY
                self._plan_key, recorder.recording = key, True
        return _HOOKS

    def _seed_of(self, span: int) -> int:
        """Stochastic-rounding seed of the ``span``-th span of the current forward."""
        return mix_seed(self.seed, self.forwards, span)

    def _begin(self) -> None:
        _ACTIVE.engine = self

    def _end(self, plan: ForwardPlan | None, kept: frozenset[int], merge: bool) -> None:
        """An outermost forward in hook mode returned (``merge``: a scoped function after the model's
        forward, counted with it)."""
        _ACTIVE.engine = None
        if plan is not None and self._plan_key is not None:
            plan.kept = kept
            self.plans.put(self._plan_key, plan)
        self._plan_key = None
        self.ledger.end_forward(merge=merge)
        if not merge:
            self.forwards += 1
