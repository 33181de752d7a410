"""What a pack hook hands to autograd: one holder per saved tensor, with exact byte accounting.

``SavedTensor`` holds either the tensor itself (not quantized) or its ``QuantizedTensor`` plus what
is needed to give backward a tensor of the original shape, dtype and strides. ``Ledger`` counts,
exactly, the bytes every live holder keeps (``QuantizedTensor.nbytes`` for quantized ones) next to
the bytes the unquantized tensor would have kept; a holder gives its bytes back when autograd
frees it, so the live count returns to zero after backward. ``unpack_saved`` is the unpack hook
of every agoq pack hook.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..quant import Kernels, QuantizedTensor, dequantize, quantize
from .fused_recipes import rebuild
from .identity import dense_permutation
from .span import SpanPlan, Usage, decide

if TYPE_CHECKING:
    from .recipe import Recipe

QUANTIZABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Floating types the quantizer accepts."""


@dataclass(frozen=True)
class QuantSpec:
    """How activations are quantized (everything but the bit-width)."""

    group_size: int = 128
    """Elements per scale."""
    scale_dtype: torch.dtype = torch.bfloat16
    """Storage type of the scales."""
    stochastic: bool = False
    """Stochastic instead of round-to-nearest rounding."""
    kernels: Kernels | None = None
    """Which backend runs the quantize/dequantize ops (the engine's ``agoq_kernels``; ``None``: the
    process default)."""


def is_row_statistic(t: torch.Tensor) -> bool:
    """True for per-row statistics: a trailing dimension of size 1 (a norm's rstd/mean, keepdim
    reductions). Each value rescales a whole row in backward, so they are never quantized."""
    return t.dim() >= 2 and t.shape[-1] == 1


def quantizable(t: torch.Tensor, min_numel: int) -> bool:
    """Whether ``t`` may be stored quantized: a supported floating type, at least ``min_numel``
    elements, not a row statistic, and no broadcast (stride-0) dimension, whose materialisation
    would cost more than it saves."""
    if t.dtype not in QUANTIZABLE_DTYPES or t.numel() < max(min_numel, 1):
        return False
    if is_row_statistic(t):
        return False
    return all(st != 0 or sz == 1 for st, sz in zip(t.stride(), t.shape, strict=True))


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the elements of ``t`` (not of its whole storage)."""
    return t.numel() * t.element_size()


@dataclass
class Ledger:
    """Exact byte accounting of all live holders of one quantizer (thread-safe: autograd may free
    holders on its worker threads)."""

    live_stored: int = 0
    """Bytes held right now."""
    live_baseline: int = 0
    """Bytes the same tensors would hold unquantized."""
    live_bf16: int = 0
    """Bytes the same tensors would hold in bf16."""
    peak_stored: int = 0
    """Highest ``live_stored`` since ``reset_peaks``."""
    peak_baseline: int = 0
    """Highest ``live_baseline`` since ``reset_peaks``."""
    peak_bf16: int = 0
    """Highest ``live_bf16`` since ``reset_peaks``."""
    live_tensors: int = 0
    """Holders alive."""
    _class_usage: dict[str, Usage] = field(default_factory=lambda: defaultdict(Usage), repr=False)
    _module_usage: dict[tuple[str, str], Usage] = field(default_factory=lambda: defaultdict(Usage), repr=False)
    _replayed: dict[int, list] = field(default_factory=dict, repr=False)
    """Per replayed plan: [usage per class, usage per module, forwards], added up when read."""
    forward: Usage = field(default_factory=Usage)
    """Usage of the forward in progress."""
    forwards: list[Usage] = field(default_factory=list)
    """Usage of each completed forward since ``reset_usage``."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def by_class(self) -> dict[str, Usage]:
        """Usage per layer class since ``reset_usage``."""
        self._settle()
        return self._class_usage

    @property
    def by_module(self) -> dict[tuple[str, str], Usage]:
        """Usage per (module name, class) since ``reset_usage``."""
        self._settle()
        return self._module_usage

    def _settle(self) -> None:
        with self._lock:
            for by_class, by_module, times in self._replayed.values():
                for cls, usage in by_class.items():
                    self._class_usage[cls].merge(usage, times)
                for key, usage in by_module.items():
                    self._module_usage[key].merge(usage, times)
            self._replayed.clear()

    def hold(self, stored: int, baseline: int, numel: int) -> None:
        """A holder started keeping ``stored`` bytes (``baseline`` unquantized)."""
        self.hold_many(stored, baseline, numel, 1)

    def hold_many(self, stored: int, baseline: int, numel: int, tensors: int) -> None:
        """``tensors`` holders started keeping ``stored`` bytes in all (one replayed forward)."""
        with self._lock:
            self.live_stored += stored
            self.live_baseline += baseline
            self.live_bf16 += 2 * numel
            self.live_tensors += tensors
            self.peak_stored = max(self.peak_stored, self.live_stored)
            self.peak_baseline = max(self.peak_baseline, self.live_baseline)
            self.peak_bf16 = max(self.peak_bf16, self.live_bf16)

    def change(self, delta_stored: int) -> None:
        """A live holder's stored bytes changed (quantized after the fact, or upgraded)."""
        with self._lock:
            self.live_stored += delta_stored
            self.peak_stored = max(self.peak_stored, self.live_stored)

    def drop(self, stored: int, baseline: int, numel: int) -> None:
        """A holder was freed."""
        with self._lock:
            self.live_stored -= stored
            self.live_baseline -= baseline
            self.live_bf16 -= 2 * numel
            self.live_tensors -= 1

    def record(
        self,
        cls: str,
        module: str,
        numel: int,
        stored: int,
        baseline: int,
        quantized: bool,
        n: int = 1,
        derived: bool = False,
    ) -> None:
        """Count a finalised holder (``n = -1`` with the old numbers takes it back)."""
        with self._lock:
            self._class_usage[cls].add(numel, stored, baseline, quantized, n, derived)
            self._module_usage[(module, cls)].add(numel, stored, baseline, quantized, n, derived)
            self.forward.add(numel, stored, baseline, quantized, n, derived)

    def add_forward(self, by_class: dict[str, Usage], by_module: dict[tuple[str, str], Usage], total: Usage) -> None:
        """Count a whole forward's finalised holders at once (a replayed plan, ``plan.py``; the
        per-class and per-module counts are added up when read)."""
        with self._lock:
            entry = self._replayed.get(id(by_class))
            if entry is None or entry[0] is not by_class:
                self._replayed[id(by_class)] = [by_class, by_module, 1]
            else:
                entry[2] += 1
            self.forward.merge(total)

    def end_forward(self, merge: bool = False) -> None:
        """Close the usage of the forward in progress (``merge``: add it to the last one instead)."""
        with self._lock:
            if merge and self.forwards:
                self.forwards[-1].merge(self.forward)
            else:
                self.forwards.append(self.forward)
            self.forward = Usage()

    def reset_peaks(self) -> None:
        """Start a new peak window at the current live bytes."""
        with self._lock:
            self.peak_stored, self.peak_baseline, self.peak_bf16 = self.live_stored, self.live_baseline, self.live_bf16

    def reset_usage(self) -> None:
        """Forget per-class/module/forward usage (called once per optimizer step)."""
        with self._lock:
            self._class_usage = defaultdict(Usage)
            self._module_usage = defaultdict(Usage)
            self._replayed = {}
            self.forwards = []


_NO_REQUESTS: tuple = ()
"""``requests`` of a replayed holder (nothing asks for it again: the plan decided)."""


class SavedTensor:
    """One saved memory span as autograd keeps it: the tensor itself until ``finalize``, then either
    the tensor (not quantized) or its quantized form.

    A dense tensor (a permutation of a contiguous layout) is kept in memory order, so every view of
    the same span (a transpose, a reshape, the 2-D view a Linear saves of its 3-D input) shares
    one holder and gets its own shape and strides back (``SavedView``). Other tensors are kept as
    they are or, quantized, as a contiguous copy.
    """

    __slots__ = (
        "__weakref__",
        "_dequantized",
        "_dtype",
        "baseline",
        "bits",
        "cls",
        "dense",
        "final",
        "held",
        "kernels",
        "ledger",
        "log_space",
        "module",
        "nonfinite",
        "numel",
        "perm",
        "q",
        "quantizable",
        "raw",
        "reads",
        "requests",
        "stored",
    )

    derived = False
    """Stored, not recomputed (``span.span_of``)."""

    def __init__(self, t: torch.Tensor, ledger: Ledger, min_numel: int = 0, span: SpanPlan | None = None) -> None:
        """A holder of ``t``. Recording (``span`` is ``None``): its layout worked out here, its class
        and bits decided later (``finalize``). Replay: the layout is ``span``'s, which a recorded
        forward decided, and ``store(span, ...)`` follows at once."""
        if span is None:
            perm = dense_permutation(t)
            self.dense = perm is not None
            self.perm: tuple[int, ...] | None = tuple(perm) if perm is not None else None
            """Permutation of the first saved view to memory order (``None``: not dense)."""
            self.raw: torch.Tensor | None = t.permute(perm) if perm is not None else t
            self.quantizable = quantizable(t, min_numel)
            self.numel = t.numel()
            self.baseline = tensor_bytes(t)
            self.requests: list[tuple[int, str | None]] | tuple = []
            self.log_space = False
            """True for log-probabilities (a log-softmax output): stored as probabilities, see
            ``_source``."""
        else:
            self.perm, self.dense, self.quantizable, self.log_space = (
                span.perm,
                span.dense,
                span.quantizable,
                span.log_space,
            )
            # Unpacking views ``raw`` through ``as_strided``, which reads only its storage and offset:
            # ``t`` serves as well as its memory-order permutation unless it is quantized.
            self.raw = t if span.perm is None or span.bits >= 16 else t.permute(span.perm)
            self.numel, self.baseline = span.numel, span.baseline
            self.requests = _NO_REQUESTS
        self.q: QuantizedTensor | None = None
        self._dtype = t.dtype
        self.stored = self.baseline
        self.bits = 16
        self.cls = ""
        self.module = ""
        self.final = False
        self._dequantized: torch.Tensor | None = None
        self.kernels: Kernels | None = None
        """The backend of this span's dequantize (its quantize's, set by ``store``)."""
        self.reads = 0
        """Reads backward will make of the span: views handed to autograd plus recipes over it. The
        rebuilt tensor is kept from the first to the last, so each span is dequantized once."""
        self.ledger = ledger
        self.held = False
        self.nonfinite = False
        """True when a finiteness check found NaN/Inf in the span (it is then kept as it is)."""

    def store(self, span: SpanPlan, spec: QuantSpec, seed: int, check_finite: bool = False) -> None:
        """Store the span as ``span`` decides (``span.decide`` while recording, a plan on replay):
        counted under its class and module, quantized at ``span.bits`` below 16 (the full-precision
        tensor released), kept as it is otherwise. ``check_finite``: keep it as it is if it holds
        NaN/Inf (sets ``nonfinite``; reads the device, so only while tracing). Counting the bytes
        live is the caller's (``hold``, or ``Ledger.hold_many`` for a whole replayed forward)."""
        self.cls, self.module, self.final = span.cls, span.module, True
        self.quantizable, self.log_space, self.kernels = span.quantizable, span.log_space, spec.kernels
        if span.bits < 16:
            self._store_quantized(span.bits, spec, seed, check_finite)

    def hold(self) -> None:
        """Start counting this holder's bytes as live (at the latest when it is finalised; earlier
        when it keeps an unquantized tensor alive for a while, as in a traced forward)."""
        if not self.held:
            self.held = True
            self.ledger.hold(self.stored, self.baseline, self.numel)

    def view(self, t: torch.Tensor) -> SavedView:
        """What a pack hook returns for ``t`` (a view of this span, read once by backward)."""
        return self.read_view(tuple(t.shape), t.stride())

    def read_view(self, shape: tuple[int, ...], stride: tuple[int, ...]) -> SavedView:
        """A view of this span that backward reads once (counted in ``reads``)."""
        self.reads += 1
        return SavedView(self, shape, stride)

    def finalize(
        self,
        cls: str,
        module: str,
        requested: list[int],
        force_raw: bool,
        spec: QuantSpec,
        seed: int,
        calibrate=None,
        check_finite: bool = False,
    ) -> None:
        """Decide how the span is stored (``span.decide``: class, module, the bit-widths its savers
        ``requested``) and ``store`` it.

        ``calibrate(t, cls, module, quantizable)`` (optional) sees the tensor first. ``check_finite``:
        keep the span as it is if it holds NaN/Inf (sets ``nonfinite``; reads the device, so only
        while tracing).
        """
        assert self.raw is not None and not self.final
        span = decide(
            cls,
            module,
            self.numel,
            self.baseline,
            requested,
            perm=self.perm,
            dense=self.dense,
            quantizable=self.quantizable and not force_raw,
            log_space=self.log_space,
        )
        if calibrate is not None:
            calibrate(self._source() if span.quantizable else self.raw, cls, module, span.quantizable)
        self.store(span, spec, seed, check_finite)
        self.hold()
        self.ledger.record(cls, module, self.numel, self.stored, self.baseline, self.q is not None)

    def upgrade(self, t: torch.Tensor, bits: int, spec: QuantSpec, seed: int) -> None:
        """Another consumer saved the same data (``t``, still alive) and wants ``bits``: store the
        span at that width if it is more than now (a span stored quantized passed any finiteness
        check already)."""
        if not self.final or self.q is None or bits <= self.bits:
            return
        self.ledger.record(self.cls, self.module, -self.numel, -self.stored, -self.baseline, True, n=-1)
        perm = dense_permutation(t)
        self.raw = t.permute(perm) if self.dense and perm is not None else t
        if bits >= 16:
            self.ledger.change(self.baseline - self.stored)
            self.q, self.bits, self.stored = None, 16, self.baseline
        else:
            self._store_quantized(bits, spec, seed)
        self.ledger.record(self.cls, self.module, self.numel, self.stored, self.baseline, self.q is not None)

    def _source(self) -> torch.Tensor:
        """What is quantized: the span in memory order (probabilities for log-probabilities)."""
        src = self.raw.detach()
        if not self.dense:
            src = src.contiguous()
        if self.log_space:
            # Backward exponentiates log-probabilities; an absolute error e in log space is a
            # relative error e^e - 1 of every probability (e ~ 0.1 at 8 bits over a [-25, 0] range).
            # Probabilities quantize with absolute error <= max_p / 2**bits instead.
            src = src.float().exp()
        return src

    def _stochastic(self, spec: QuantSpec) -> bool:
        """Whether this span rounds stochastically: as configured, and probabilities always (rounded to
        nearest, the many small ones of a row read back 0 and their gradient, softmax - onehot, loses
        its push-down on them: a bias)."""
        return spec.stochastic or self.log_space

    def _store_quantized(self, bits: int, spec: QuantSpec, seed: int, check_finite: bool = False) -> None:
        src = self._source()
        stochastic = self._stochastic(spec)
        q = quantize(
            src,
            bits,
            spec.group_size,
            stochastic=stochastic,
            seed=seed,
            scale_dtype=spec.scale_dtype,
            kernels=spec.kernels,
        )
        if check_finite and bool(q.scales.isnan().any()):
            # A group holding NaN/Inf reads back all-NaN (format.py). Stock backward may never read
            # the non-finite entries (-inf at masked positions under amax/logsumexp/clamp), so the
            # span is kept as it is: backward sees exactly what it would see without agoq.
            self.nonfinite = True
            if self.held:
                self.ledger.change(self.baseline - self.stored)
            self.q, self.bits, self.stored = None, 16, self.baseline
            return
        if self.held:
            self.ledger.change(q.nbytes - self.stored)
        self.q, self.bits, self.stored = q, bits, q.nbytes
        self.raw = None
        self._dequantized = None

    def unpack(self, shape: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
        """The tensor for backward, in the requesting view's shape (and, when possible, strides).

        A quantized span is dequantized at its first read and the result kept until its last
        (``reads``), as stock keeps the tensor itself: the q/k/v projections, a norm's backward and
        the recipes over its input read one span several times in a row. A read beyond the count
        (a retained graph run again) dequantizes afresh.
        """
        flat = self.raw
        if flat is None:
            flat = self._dequantized
            if flat is None:
                flat = dequantize(self.q, flat=True, kernels=self.kernels)
                if self.log_space:
                    flat = flat.log().to(self._dtype)
            self.reads -= 1
            self._dequantized = flat if self.reads > 0 else None
            if not self.dense:
                return flat.view(shape)
        return flat.as_strided(shape, stride)  # a dense span in memory order: any view's strides apply

    def __del__(self) -> None:
        if getattr(self, "held", False):
            self.ledger.drop(self.stored, self.baseline, self.numel)


class SavedView:
    """A pack hook's result: one holder plus the shape and strides the saving op used."""

    __slots__ = ("holder", "shape", "stride")

    def __init__(self, holder: SavedTensor, shape: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.holder, self.shape, self.stride = holder, shape, stride

    def unpack(self) -> torch.Tensor:
        """The tensor for backward."""
        return self.holder.unpack(self.shape, self.stride)


class DerivedTensor:
    """A saved tensor kept as a recipe over other stored tensors of the forward: 0 bytes.

    ``recipe.py`` says which: activation outputs (``silu(g)``), an RMSNorm's normalised value and
    output, the gating product. Backward gets ``recipe(dequantized sources)``: computed from the same
    stored inputs the ops' own backward reads.
    """

    __slots__ = (
        "__weakref__",
        "_result",
        "baseline",
        "bits",
        "bound",
        "cls",
        "final",
        "held",
        "ledger",
        "module",
        "numel",
        "reads",
        "recipe",
        "requests",
        "sources",
    )

    stored = 0
    """Bytes held of its own."""
    derived = True
    """Recomputed in backward (``span.span_of``)."""

    def __init__(
        self,
        sources: tuple[SavedView, ...],
        recipe: Recipe,
        t: torch.Tensor,
        ledger: Ledger,
        bound: Recipe | None = None,
    ):
        self.sources, self.recipe = sources, recipe
        self.bound = bound if bound is not None else recipe
        """What is evaluated: ``recipe`` with this forward's copies of ZeRO-3 parameters
        (``recipe.bind_parameters``)."""
        self.numel = t.numel()
        self.baseline = tensor_bytes(t)
        self.bits = 0
        self.cls = ""
        self.module = ""
        self.final = False
        self.held = False
        self.requests: list[tuple[int, str | None]] = []
        self._result: torch.Tensor | None = None
        self.reads = 0
        """Views handed out (the result is kept until this holder is freed)."""
        self.ledger = ledger

    def hold(self) -> None:
        """Count the (zero) stored bytes and the baseline as live."""
        if not self.held:
            self.held = True
            self.ledger.hold(0, self.baseline, self.numel)

    def view(self, t: torch.Tensor) -> SavedView:
        """What a pack hook returns for ``t``."""
        return self.read_view(tuple(t.shape), t.stride())

    def read_view(self, shape: tuple[int, ...], stride: tuple[int, ...]) -> SavedView:
        """A view of the recomputed tensor."""
        self.reads += 1
        return SavedView(self, shape, stride)

    def count_source_reads(self) -> None:
        """The recipe is kept: each source span gets one more read (its evaluation in backward)."""
        for view in self.sources:
            view.holder.reads += 1

    def stored_leaves(self) -> list[SavedTensor]:
        """The stored holders this recipe reads, through any recomputed sources."""
        leaves: list[SavedTensor] = []
        for view in self.sources:
            holder = view.holder
            leaves += holder.stored_leaves() if isinstance(holder, DerivedTensor) else [holder]
        return leaves

    def finalize(
        self,
        cls: str,
        module: str,
        requested: list[int],
        force_raw: bool,
        spec: QuantSpec,
        seed: int,
        calibrate=None,
        check_finite: bool = False,
    ) -> None:
        """Fix class and module and count the tensor (nothing is stored)."""
        self.cls, self.module, self.final = cls, module, True
        if calibrate is not None:
            calibrate(None, cls, module, False, self.numel)
        self.hold()
        self.ledger.record(cls, module, self.numel, 0, self.baseline, False, derived=True)

    def upgrade(self, t: torch.Tensor, bits: int, spec: QuantSpec, seed: int) -> None:
        """Nothing to upgrade: the precision is the sources'."""

    def unpack(self, shape: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
        """The recipe's result, in the requesting view's shape and strides.

        Computed once and kept until autograd frees this holder: the consumers of a recomputed
        tensor (q, k and v projections) run back to back in backward, and stock keeps the tensor
        itself all along."""
        y = self._result
        if y is None:
            y = rebuild(self)  # one fused kernel (dequantize + recipe) where one applies
            if y is None:
                y = self.bound([view.unpack() for view in self.sources])
            self._result = y
        if y.is_contiguous():  # the usual case, without working out a permutation (a few us per unpack)
            return y.as_strided(shape, stride)
        perm = dense_permutation(y)
        flat = y.permute(perm) if perm is not None else y.contiguous()
        return flat.as_strided(shape, stride)

    def __del__(self) -> None:
        if getattr(self, "held", False):
            self.ledger.drop(0, self.baseline, self.numel)


def unpack_saved(packed: Any) -> torch.Tensor:
    """The unpack hook of every agoq ``saved_tensors_hooks``: a holder's view rebuilt, anything else as
    it was packed (its identity tells agoq's own hooks from another owner's)."""
    return packed.unpack() if isinstance(packed, SavedView) else packed
