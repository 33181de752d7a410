"""``GradientStore``: the per-step lifecycle every 8-bit gradient host shares.

A host is whatever owns gradients between backward and ``step()``: the ZeRO-1/2 optimizer subclass, the
ZeRO-3 one, the ``BF16_Optimizer`` subclass and the stage-0 ``ParamGradients``. They differ in where
gradients come from and which DeepSpeed buffers the step reads; they share, and keep here once:

* the stochastic-rounding seed stream (``seed``: config seed, rank, step, call counter);
* the accumulators (int8 codes + per-group scales + error-feedback residual, or fp32 below
  ``min_numel``), keyed by the host (a param group, a parameter id, ``"partition"``);
* the step boundary (``finish_step``): accumulators that live within a step are freed, and after a
  skipped (overflowed) step gradients and residuals are dropped, as DeepSpeed drops the gradients;
* the statistics (``accounting``, ``note_buffers``, ``stats``);
* the checkpoint state (``state`` / ``load_state``) and its layout check: residuals are restored only
  for the layout that wrote them (host, world size, group size, the host's own layout figures).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Any

import torch

from ..config import AgoqConfig, GradientConfig
from ..quant import Kernels, kernels_for
from ..seeding import mix_seed
from .accounting import GradientAccounting
from .accumulator import Accumulator, Fp32Accumulator, gradient_accumulator

STATE_VERSION = 2
"""Version of ``GradientStore.state()``; another version is not restored (1: the per-host formats
before the store, keyed ``partition_residuals``/``param_residuals`` or ``residuals``)."""

STATE_KEY = "agoq_gradient"
"""Key of the agoq entry (``GradientStore.state()``) in a gradient host optimizer's ``state_dict()``."""


class GradientStore:
    """Accumulators, seeds, statistics and checkpoint state of one 8-bit gradient host."""

    def __init__(
        self,
        config: AgoqConfig,
        *,
        host: str,
        rank: int,
        world_size: int,
        device: torch.device | str,
        kernels: Kernels | None = None,
    ) -> None:
        self.config = config
        """The agoq settings."""
        self.kernels = kernels if kernels is not None else kernels_for(config.kernel_backend)
        """The engine's kernel choice (``agoq.kernel_backend``), passed to the accumulators and the
        reductions (``reduction_args(..., kernels=store.kernels)``)."""
        self.host = host
        """Which host owns the store (saved with the state; another host's state is not restored)."""
        self.rank = rank
        """Data-parallel rank (seeds stochastic rounding)."""
        self.world_size = world_size
        """Data-parallel world size (part of the checkpoint layout)."""
        self.device = torch.device(device)
        """Where the accumulators live."""
        self.accounting = GradientAccounting()
        """Per-step bytes and buffer figures."""
        self.step = 0
        """Optimizer steps finished (seeds stochastic rounding; saved in checkpoints)."""
        self._per_step: dict[Hashable, Accumulator] = {}
        """Accumulators whose value lives within one optimizer step (reset by ``finish_step``)."""
        self._carried: dict[Hashable, Accumulator] = {}
        """Accumulators that the host resets itself (per-parameter folds, consumed at the boundary)."""
        self._calls = 0

    @property
    def gradient(self) -> GradientConfig:
        """The ``agoq.gradient`` settings."""
        return self.config.gradient

    def seed(self, *parts: int) -> int:
        """A fresh stochastic-rounding seed: distinct per rank, step, call and ``parts``."""
        self._calls += 1
        return mix_seed(self.config.seed, self.rank, self.step, self._calls, *parts)

    # --- accumulators --------------------------------------------------------------------------

    def add_per_step(self, key: Hashable, numel: int, *, quantized: bool = True, release: bool = True) -> Accumulator:
        """An accumulator of ``numel`` elements that ``finish_step`` empties (freed when ``release``):
        int8 when ``quantized`` (fp32 below ``min_numel``), else fp32."""
        if quantized:
            acc = gradient_accumulator(
                numel, self.gradient, device=self.device, release_on_reset=release, kernels=self.kernels
            )
        else:
            acc = Fp32Accumulator(numel, device=self.device, release_on_reset=release)
        self._per_step[key] = acc
        return acc

    def add_carried(self, key: Hashable, numel: int) -> Accumulator:
        """An int8 accumulator (fp32 below ``min_numel``) the host empties itself."""
        acc = gradient_accumulator(numel, self.gradient, device=self.device, kernels=self.kernels)
        self._carried[key] = acc
        return acc

    def step_accumulator(self, key: Hashable) -> Accumulator | None:
        """The per-step accumulator under ``key`` (a partition, a param group), None if there is none."""
        return self._per_step.get(key)

    def fold_accumulator(self, key: Hashable) -> Accumulator | None:
        """The carried accumulator under ``key`` (a parameter's folds), None if there is none."""
        return self._carried.get(key)

    def per_step_items(self) -> Iterator[tuple[Hashable, Accumulator]]:
        """``(key, accumulator)`` of the per-step accumulators, in the order they were added."""
        yield from self._per_step.items()

    @property
    def folds(self) -> bool:
        """Whether the host keeps carried accumulators (per-parameter folds across micro-batches)."""
        return bool(self._carried)

    def reset_carried(self) -> None:
        """Forget the carried accumulators' values (``zero_grad``); residuals carry on."""
        for acc in self._carried.values():
            acc.reset()

    def accumulators(self) -> Iterator[Accumulator]:
        """Every accumulator, per-step ones first."""
        yield from self._per_step.values()
        yield from self._carried.values()

    def pending(self) -> bool:
        """Whether some accumulator holds a value."""
        return any(acc.has_value for acc in self.accumulators())

    def reset(self) -> None:
        """Forget every accumulated value (``zero_grad``); residuals carry on."""
        for acc in self.accumulators():
            acc.reset()

    # --- step boundary -------------------------------------------------------------------------

    def finish_step(self, *, overflow: bool) -> None:
        """After ``optimizer.step()``: per-step accumulators restart; after a skipped step every value and
        residual is dropped; the statistics of the step are snapshot; the seed stream moves on."""
        for acc in self._per_step.values():
            acc.reset()
        if overflow:
            for acc in self.accumulators():
                acc.reset()
                acc.reset_residual()
        self.accounting.finish_step()
        self.step += 1
        self._calls = 0

    # --- statistics ----------------------------------------------------------------------------

    def note_buffers(self, *, per_step: bool = True) -> None:
        """Record the gradient-buffer bytes held now (the step keeps the peak); ``per_step=False``
        leaves out the per-step accumulators (a ZeRO-1 partition that only exists during ``step()``)."""
        partitions = list(self._per_step.values()) if per_step else []
        held = [*partitions, *self._carried.values()]
        buffer = sum(acc.nbytes for acc in held)
        # What stock DeepSpeed holds in fp32: the whole partition, and the per-parameter gradients that exist.
        fp32 = sum(4 * acc.numel for acc in partitions) + sum(
            4 * acc.numel for acc in self._carried.values() if acc.nbytes
        )
        ef = sum(acc.residual_nbytes for acc in held)
        self.accounting.note_buffers(buffer, fp32, ef)

    def stats(self) -> dict[str, float]:
        """Figures of the last finished step (the step in progress before the first one):
        ``comm_bytes`` sent by this rank and the ``comm_bytes_baseline_fp32/bf16`` that DeepSpeed's own
        reduction of the same gradients sends (``comm_bytes_ratio_*``); ``buffer_bytes`` (peak gradient
        storage: int8 codes + scales) versus ``buffer_bytes_fp32``; ``ef_bytes``; ``state_bytes``;
        ``rs_error_bound_rel`` / ``rs_error_est_rel``; ``micro_steps``; ``steps``."""
        return dict(self.accounting.last or self.accounting.snapshot())

    # --- checkpointing -------------------------------------------------------------------------

    def _layout(self, layout: dict[str, Any]) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "host": self.host,
            "world_size": self.world_size,
            "group_size": self.gradient.group_size,
            **layout,
        }

    def state(self, **layout: Any) -> dict[str, Any]:
        """Plain tensors, dicts and numbers: the layout (``layout`` adds the host's own figures), the step
        counter and every accumulator's error-feedback residual."""
        return {
            **self._layout(layout),
            "step": self.step,
            "per_step_residuals": {k: acc.residual_state() for k, acc in self._per_step.items()},
            "carried_residuals": {k: acc.residual_state() for k, acc in self._carried.items()},
        }

    def mismatch(self, state: dict[str, Any] | None, **layout: Any) -> str | None:
        """Why ``state`` cannot be restored into this layout (None: it can, or there is none)."""
        if not isinstance(state, dict):
            return None
        if state.get("version") != STATE_VERSION:
            return (
                f"it was written by another agoq-ds version (gradient state version {state.get('version')}, "
                f"this one reads {STATE_VERSION})"
            )
        expected = self._layout(layout)
        differ = [f"{k} {state.get(k)!r} (here {v!r})" for k, v in expected.items() if state.get(k) != v]
        return "its layout differs: " + ", ".join(differ) if differ else None

    def load_state(self, state: dict[str, Any] | None, **layout: Any) -> bool:
        """Restore ``state()``'s result when it was written for this layout; otherwise (no state, another
        layout, a residual that does not fit) residuals start from zero and False is returned."""
        expected = self._layout(layout)
        fits = isinstance(state, dict) and all(state.get(k) == v for k, v in expected.items())
        if not fits:
            for acc in self.accumulators():
                acc.reset_residual()
            return False
        ok = True
        for saved, accs in (("per_step_residuals", self._per_step), ("carried_residuals", self._carried)):
            residuals = state.get(saved, {})
            for key, acc in accs.items():
                ok = acc.load_residual_state(residuals.get(key)) and ok
        self.step = int(state.get("step", self.step))
        return ok
