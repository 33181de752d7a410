"""``GradientHost``: the one interface between the AGoQ engine and whatever holds its 8-bit gradients.

Four hosts exist: ``AgoqZeroOptimizer`` (ZeRO-1/2), ``AgoqStage3Optimizer`` (ZeRO-3),
``AgoqBF16Optimizer`` (``BF16_Optimizer``) and ``ParamGradients`` (ZeRO stage 0 otherwise). The
engine talks to each through these names only, one per role:

* ``agoq_store``: the shared lifecycle (seeds, accumulators, statistics, checkpoint state);
* ``agoq_engine_reduces``: whether the engine's own all-reduce (``buffered_allreduce_fallback``) must
  call ``agoq_reduce`` at the boundary (stage 0); ZeRO hosts reduce inside DeepSpeed's backward hooks;
* ``agoq_reduce``, ``agoq_materialize``: reduce the accumulated gradients / put them where DeepSpeed
  reads them without communicating (a tied-weight reduction, a step without reduction);
* ``agoq_before_step``, ``agoq_after_step``: the step protocol, around DeepSpeed's optimizer step
  (the optimizer hosts' one ``step`` wrapper, ``OptimizerHost.step``; where no optimizer subclass
  exists, ``agoq_engine_steps``, the engine's step runs it);
* ``agoq_zero_grad``, ``agoq_close``: ``engine.zero_grad`` and ``engine.destroy`` reached the host;
* ``agoq_rank_state``, ``agoq_load_rank_state``: per-rank state DeepSpeed's checkpoint does not hold;
* ``agoq_stats``: the figures of the last step;
* ``agoq_param_paths``: which trainable parameters' gradients can meet a quantizer (``paths.py``);
* ``agoq_description``: one line for the start-up summary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .paths import Path, count_paths
from .store import GradientStore


class GradientHost:
    """Mixin of every 8-bit gradient host (see module docstring); hosts set ``agoq_store`` and
    ``agoq_active`` and override the roles they take part in."""

    agoq_store: GradientStore
    """The host's seeds, accumulators, statistics and checkpoint state."""
    agoq_engine_reduces: bool = False
    """True when the engine calls ``agoq_reduce`` at the accumulation boundary."""
    agoq_engine_steps: bool = False
    """True when no optimizer subclass runs the step protocol and the engine's step does (stage 0)."""
    agoq_rank_file: bool = False
    """True when the host has per-rank state (``agoq_rank_state``) that the engine saves to its own file."""
    agoq_description: str = ""
    """What the reduction is, for the start-up summary (e.g. ``8-bit reduce-scatter ...``)."""

    @property
    def agoq_active(self) -> bool:
        """Whether the 8-bit path is switched on (else the host behaves as DeepSpeed's own code)."""
        return bool(getattr(self, "_agoq_active", False))

    def agoq_reduce(self, *, group: Any, scale: float, comm_dtype: torch.dtype, elements_per_buffer: int) -> None:
        """Reduce the accumulated gradients over ``group`` (scaled by ``scale``) into the buffers
        DeepSpeed's step reads. Only hosts with ``agoq_engine_reduces`` are asked."""
        raise NotImplementedError(f"{type(self).__name__} reduces inside DeepSpeed's backward hooks")

    def agoq_materialize(self, params: Sequence[torch.nn.Parameter] | None = None) -> None:
        """Put accumulated, not yet reduced gradients where DeepSpeed reads them, without communicating
        (``params``: only those, where the host can tell them apart). Nothing to do by default."""

    def agoq_before_step(self) -> None:
        """Right before DeepSpeed's optimizer step: make sure the step reads the accumulated gradients
        (a step without a reduction, e.g. ``no_sync``, steps on the local sums) and note the buffer
        bytes held. Only called while the host is active."""
        self.agoq_store.note_buffers()

    def agoq_after_step(self, overflow: bool) -> None:
        """Right after it: the per-step accumulators restart; after a skipped step (``overflow``) the
        gradients and error-feedback residuals are dropped, as DeepSpeed drops the gradients."""
        self.agoq_store.finish_step(overflow=overflow)

    def agoq_zero_grad(self) -> None:
        """``engine.zero_grad`` ran: drop gradients held beside DeepSpeed's own buffers. Nothing by
        default (the optimizer hosts keep theirs in DeepSpeed's buffers, which DeepSpeed clears)."""

    def agoq_close(self) -> None:
        """The engine is destroyed: remove what the host registered (hooks). Nothing by default."""

    def agoq_rank_state(self) -> dict[str, Any]:
        """State of this rank that DeepSpeed's checkpoint does not hold (stage 0 saves optimizer state
        from data-parallel rank 0 only), for the engine to write to a per-rank file (``agoq_rank_file``)."""
        raise NotImplementedError(f"{type(self).__name__} keeps its state in DeepSpeed's checkpoint")

    def agoq_load_rank_state(self, state: dict[str, Any] | None) -> str | None:
        """Restore ``agoq_rank_state``'s result (``None``: the file was missing); returns why it was not
        restored (error feedback then starts from zero), or ``None`` when it was."""
        raise NotImplementedError(f"{type(self).__name__} keeps its state in DeepSpeed's checkpoint")

    def agoq_stats(self) -> dict[str, float]:
        """Figures of the last finished optimizer step on this rank (``GradientStore.stats``) and how many
        of this rank's trainable parameters are on the exact and on the 8-bit path."""
        return {**self.agoq_store.stats(), **self.agoq_path_counts()}

    def agoq_path_counts(self) -> dict[str, float]:
        """``count_paths`` of ``agoq_param_paths``, worked out once: the paths follow from sizes fixed at
        construction, and the statistics are read every ``steps_per_print`` steps."""
        counts = getattr(self, "_agoq_path_counts", None)
        if counts is None:
            counts = count_paths(self.agoq_param_paths().values())
            self._agoq_path_counts = counts
        return counts

    def agoq_param_paths(self) -> dict[int, Path]:
        """``id(param) -> "exact" | "8bit"`` for every trainable parameter the host holds (``paths.py``)."""
        raise NotImplementedError


def gradient_host(candidate: Any) -> GradientHost | None:
    """``candidate`` when it is a switched-on gradient host, else None."""
    if isinstance(candidate, GradientHost) and candidate.agoq_active:
        return candidate
    return None
