"""Per-forward plans: what every saved tensor of a forward became, replayed without hooks.

Tracing a forward costs Python per module call (pre/post hooks pushing ``saved_tensors_hooks``) and
per op (``OpWatcher``). A model run again on inputs of the same shapes saves the same tensors in the
same order, so the outcome of a recorded forward is a plan: the i-th tensor saved is kept as it is,
stored as a new span (class, module, bits, memory order), recomputed from an earlier span, or a view
of an earlier span. Replaying needs one ``saved_tensors_hooks`` around the whole forward and a few
comparisons per saved tensor; each tensor is checked against the plan by shape, strides and dtype (a
view of an earlier span by its storage too), and a forward that departs from it keeps the rest of its
tensors unquantized and is recorded again.

Plans are keyed by what selects a model's code path: train/eval mode, autocast, and the shapes,
dtypes and devices of the forward's tensor arguments (plus its plain keyword arguments).
"""

from __future__ import annotations

import logging
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import nn

from .identity import Storages
from .recipe import bind_parameters
from .span import ALIAS, KEEP, NEW, ForwardPlan, SpanPlan, Step, Usage, span_of
from .storage import DerivedTensor, Ledger, QuantSpec, SavedTensor, SavedView

__all__ = [
    "ALIAS",
    "KEEP",
    "MAX_PLANS",
    "NEW",
    "ForwardPlan",
    "PlanCache",
    "Replay",
    "SpanPlan",
    "Step",
    "build_plan",
    "plan_key",
]

logger = logging.getLogger("agoq_ds.activation")

MAX_PLANS = 8
"""Plans kept per model (least recently used dropped): a few sequence lengths, train and eval."""

_PLAIN = (bool, int, float, str, type(None))


def plan_key(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """What must match for a forward to follow a recorded plan (see module docstring)."""
    parts: list[Any] = [module.training]
    for device in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device):
            parts.append((device, torch.get_autocast_dtype(device)))
    for i, a in enumerate(args):
        parts.append((i, _describe(a)))
    for k, v in kwargs.items():
        parts.append((k, _describe(v)))
    return tuple(parts)


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype, value.device, value.requires_grad)
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, tuple | list):
        return tuple(_describe(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _describe(v)) for k, v in value.items())
    return type(value)


def build_plan(records: list[tuple[tuple, tuple, torch.dtype, Any]]) -> ForwardPlan | None:
    """The plan of a recorded forward from ``(shape, stride, dtype, what pack returned or None when it
    returned the tensor itself)`` per saved tensor, all holders final; ``None`` if some outcome cannot
    be replayed."""
    index: dict[int, int] = {}
    spans: list[SpanPlan] = []
    steps: list[Step] = []
    for shape, stride, dtype, result in records:
        if result is None:
            steps.append(Step(KEEP, shape, stride, dtype))
            continue
        if not isinstance(result, SavedView):
            return None
        holder = result.holder
        i = index.get(id(holder))
        if i is not None:
            spans[i].aliased = True
            steps.append(Step(ALIAS, shape, stride, dtype, i))
            continue
        span = span_of(holder, index)
        if span is None:
            return None
        index[id(holder)] = len(spans)
        spans.append(span)
        steps.append(Step(NEW, shape, stride, dtype, len(spans) - 1))
    plan = ForwardPlan(tuple(steps), tuple(spans))
    by_class: dict[str, Usage] = defaultdict(Usage)
    by_module: dict[tuple[str, str], Usage] = defaultdict(Usage)
    for span in spans:
        derived = bool(span.derived_from)
        quantized = not derived and span.bits < 16
        for usage in (by_class[span.cls], by_module[(span.module, span.cls)], plan.total):
            usage.add(span.numel, span.stored, span.baseline, quantized, derived=derived)
    plan.by_class, plan.by_module = dict(by_class), dict(by_module)
    return plan


class PlanCache:
    """The plans of one model by ``plan_key`` (least recently used dropped beyond ``MAX_PLANS``)."""

    def __init__(self) -> None:
        self._plans: OrderedDict[tuple, ForwardPlan] = OrderedDict()

    def get(self, key: tuple) -> ForwardPlan | None:
        """The plan recorded under ``key``, if any."""
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
        return plan

    def put(self, key: tuple, plan: ForwardPlan) -> None:
        """Keep ``plan`` for forwards matching ``key``."""
        self._plans[key] = plan
        self._plans.move_to_end(key)
        while len(self._plans) > MAX_PLANS:
            self._plans.popitem(last=False)

    def drop(self, key: tuple) -> None:
        """Forget the plan under ``key`` (a forward departed from it)."""
        self._plans.pop(key, None)

    def clear(self) -> None:
        """Forget every plan (the bit-widths or the classification changed)."""
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)


class Replay:
    """One forward following a plan: the pack function of its ``saved_tensors_hooks``."""

    __slots__ = (
        "cursor",
        "deviated",
        "holders",
        "kept",
        "key",
        "ledger",
        "numbers",
        "plan",
        "seed",
        "spans",
        "spec",
        "steps",
        "stochastic",
        "storages",
    )

    def __init__(
        self,
        plan: ForwardPlan,
        key: tuple,
        ledger: Ledger,
        spec: QuantSpec,
        seed: Callable[[int], int],
    ) -> None:
        self.plan, self.key, self.ledger, self.spec, self.seed = plan, key, ledger, spec, seed
        self.kept = plan.kept
        """``id`` of every parameter and buffer of the model (never stored by agoq)."""
        self.steps, self.spans, self.stochastic = plan.steps, plan.spans, spec.stochastic
        self.cursor = 0
        """Index of the next step."""
        self.holders: list[Any] = []
        """Spans created so far, in plan order."""
        self.storages = Storages()
        self.numbers: dict[int, int] = {}
        """Storage number of each aliased span (checked by its views: the same live storage, not
        merely a later one at a freed span's address)."""
        self.deviated: int | None = None
        """Index of the first saved tensor that did not match the plan, if one did not."""

    def pack(self, t: torch.Tensor) -> Any:
        """The pack hook: the planned outcome for the next saved tensor."""
        i = self.cursor
        self.cursor = i + 1
        if self.deviated is not None:
            return t
        try:
            step = self.steps[i]
        except IndexError:
            return self._deviate(i, t, "more tensors saved than planned")
        kind = step.kind
        if kind == KEEP:  # always safe; a shifted sequence shows at the next stored step
            return t
        if t.dtype != step.dtype or t.shape != step.shape or t.stride() != step.stride:
            return self._deviate(i, t, f"planned {step.dtype} {tuple(step.shape)} strides {step.stride}")
        base = t._base
        kept = self.kept
        if id(t) in kept or (base is not None and id(base) in kept):
            return self._deviate(i, t, "a parameter or buffer where an activation was planned")
        n = step.span
        span = self.spans[n]
        if kind == ALIAS:
            if n < len(self.holders) and (not span.aliased or self.storages.alive(self.numbers[n], t)):
                return self.holders[n].read_view(step.shape, step.stride)
            return self._deviate(i, t, "not a view of the planned span")
        if span.aliased:
            self.numbers[n] = self.storages.number(t)
        if not span.derived_from:
            seed = self.seed(n) if self.stochastic or span.log_space else 0
            holder: Any = SavedTensor(t, self.ledger, span=span)
            holder.store(span, self.spec, seed)
            holder.held = True  # counted live by ``finish``, for the whole forward at once (Ledger.hold_many)
        else:
            recipe = span.recipe
            assert recipe is not None
            bound = bind_parameters(recipe)
            if bound is None:
                return self._deviate(i, t, "a ZeRO-3 parameter its recipe reads is not gathered")
            holders = self.holders
            sources = tuple(
                SavedView(holders[j], shape, stride)
                for j, (shape, stride) in zip(span.derived_from, span.source_views, strict=True)
            )
            holder = DerivedTensor(sources, recipe, t, self.ledger, bound)
            holder.count_source_reads()
            holder.cls, holder.module, holder.final, holder.held = span.cls, span.module, True, True
        self.holders.append(holder)
        return holder.read_view(step.shape, step.stride)

    def _deviate(self, i: int, t: torch.Tensor, why: str) -> torch.Tensor:
        self.deviated = i
        logger.info(
            "agoq: saved tensor %d of this forward (%s %s) departs from the recorded plan (%s); "
            "the rest of the forward is kept unquantized and the next one is recorded again",
            i,
            t.dtype,
            tuple(t.shape),
            why,
        )
        return t

    def finish(self) -> bool:
        """Count the forward in the ledger; False if it departed from the plan (drop the plan). Lets
        go of the holders: every saved tensor's autograd record keeps ``pack`` (so this object)
        alive until backward is over, and holding them here would keep every stored span and
        recomputed result until then, where stock frees each after its last use."""
        try:
            return self._count()
        finally:
            self.holders, self.numbers = [], {}
            self.storages.clear()

    def _count(self) -> bool:
        # Holders are counted live here, all at once (they drop themselves when freed).
        if self.deviated is None and self.cursor == len(self.plan.steps):
            total = self.plan.total
            self.ledger.hold_many(total.stored, total.baseline, total.numel, total.tensors)
            self.ledger.add_forward(self.plan.by_class, self.plan.by_module, total)
            return True
        if self.deviated is None:
            self.deviated = self.cursor
            logger.info(
                "agoq: this forward saved %d tensors where its plan has %d; it is recorded again",
                self.cursor,
                len(self.plan.steps),
            )
        for holder in self.holders:
            self.ledger.hold_many(holder.stored, holder.baseline, holder.numel, 1)
            derived = isinstance(holder, DerivedTensor)
            quantized = not derived and holder.q is not None
            self.ledger.record(
                holder.cls, holder.module, holder.numel, holder.stored, holder.baseline, quantized, derived=derived
            )
        return False
