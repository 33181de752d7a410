"""``ParamGradients``: 8-bit gradient accumulation and all-reduce for ZeRO stage 0 without
``BF16_Optimizer`` — fp32 models (DeepSpeed's plain engine path) and bf16 models outside a pipeline
(DeepSpeed's ``FP16_UnfusedOptimizer`` in bf16), in ``DeepSpeedEngine`` and ``PipelineEngine``.

Stock DeepSpeed keeps the running sum of the micro-batch gradients in ``param.grad`` (fp32 or bf16)
and at the accumulation boundary all-reduces them in buckets (``engine.buffered_allreduce_fallback``).
Here a post-accumulate-grad hook moves every non-boundary ``param.grad`` into a per-parameter int8
accumulator (one fp32 scale per ``group_size`` elements) and frees it. At the boundary ``reduce``
adds each accumulator to what the last micro-batch left in ``param.grad``, all-reduces the buckets
in 8 bits (averaged like DeepSpeed, ``1 / dp``) and writes the result back to ``param.grad`` in the
parameter's dtype. Clipping, the overflow check and the step then run on ``param.grad`` unchanged.
The boundary is read from the engine (``is_gradient_accumulation_boundary``), never counted: the
pipeline engine raises it only for its reduce instruction, so there every micro-batch is folded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..config import AgoqConfig
from ..seeding import mix_seed as _mix
from .accumulator import Accumulator, Int8Accumulator
from .allreduce import CHUNK_ELEMENTS, all_reduce_chunked
from .host import GradientHost
from .paths import Path, path, reduction_exact
from .store import GradientStore


class ParamGradients(GradientHost):
    """int8 ``param.grad`` accumulation across micro-batches plus the 8-bit all-reduce (see module
    docstring). Owned by the engine (``engine.agoq_param_gradients``)."""

    agoq_engine_reduces = True
    agoq_engine_steps = True
    agoq_rank_file = True

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        config: AgoqConfig,
        *,
        is_boundary: Callable[[], bool],
        rank: int,
        world_size: int,
        device: torch.device | str,
    ) -> None:
        g = config.gradient
        self.config = config
        """The agoq settings."""
        self.params = [p for p in params if p.requires_grad]
        """Trainable parameters in ``module.parameters()`` order (frozen ones are never touched)."""
        self.agoq_store = GradientStore(config, host="param_gradients", rank=rank, world_size=world_size, device=device)
        self.agoq_description = (
            "8-bit all-reduce (reduce-scatter with fp32 sum + int8 all-gather)"
            if g.communication_bits == 8
            else "fp32 all-reduce"
        )
        self._agoq_active = True
        self._is_boundary = is_boundary
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._folds: dict[int, int] = {}
        self._handles: list[Any] = []
        if config.gradient_store8:
            for i, param in enumerate(self.params):
                self.agoq_store.add_carried(i, param.numel())
                self._handles.append(param.register_post_accumulate_grad_hook(self._fold))

    def _acc(self, param: nn.Parameter) -> Accumulator | None:
        return self.agoq_store.fold_accumulator(self._index.get(id(param), -1))

    def agoq_close(self) -> None:
        """Remove the hooks (the engine is being destroyed)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # --- accumulation ------------------------------------------------------------------------------

    def _fold(self, param: nn.Parameter) -> None:
        """Post-accumulate-grad hook: move a non-boundary gradient into its int8 accumulator."""
        if param.grad is None or self._is_boundary():
            return
        self._acc(param).add_(param.grad.detach().reshape(-1), seed=self.agoq_store.seed(1))
        self._folds[id(param)] = self._folds.get(id(param), 0) + 1
        param.grad = None

    def _unfold(self, param: nn.Parameter) -> torch.Tensor | None:
        """The accumulated fp32 gradient plus ``param.grad`` (flat; None when there is neither); the
        accumulator is emptied."""
        acc = self._acc(param)
        grad = param.grad
        if acc is None or not acc.has_value:
            return None if grad is None else grad.detach().reshape(-1).float()
        total = acc.take()  # owned: an fp32 accumulator's buffer is handed over, not zeroed under us
        if grad is not None:
            total += grad.detach().reshape(-1).float()
        return total

    def agoq_materialize(self, params: Sequence[nn.Parameter] | None = None) -> None:
        """Put the accumulated gradients of ``params`` (default: all) back into ``param.grad`` without
        communicating: before a tied-weight reduction, or a step that was never reduced (``no_sync``)."""
        for param in self.params if params is None else params:
            acc = self._acc(param)
            if acc is not None and acc.has_value:
                param.grad = self._unfold(param).view(param.shape).to(param.dtype)

    def agoq_zero_grad(self) -> None:
        """Drop the accumulated gradients (``engine.zero_grad``)."""
        self.agoq_store.reset()
        self._folds.clear()

    # --- reduction ---------------------------------------------------------------------------------

    def agoq_reduce(self, *, group, scale: float, comm_dtype: torch.dtype, elements_per_buffer: int) -> None:
        """All-reduce every trainable gradient (accumulator + ``param.grad``) over ``group``, scaled by
        ``scale``, into ``param.grad``; like DeepSpeed, a parameter without gradient contributes zeros.

        Parameters are bucketed as ``engine.allreduce_no_retain`` does (a bucket closes once it holds
        more than ``elements_per_buffer`` elements, here at most ``CHUNK_ELEMENTS``).
        """
        self.agoq_store.note_buffers()
        # Micro-batches in this step: the most folds of any parameter, plus the boundary one if unfolded.
        boundary = any(p.grad is not None for p in self.params)
        self.agoq_store.accounting.micro_steps = max(self._folds.values(), default=0) + int(boundary)
        self._folds.clear()
        limit = min(int(elements_per_buffer), CHUNK_ELEMENTS)
        bucket: list[nn.Parameter] = []
        size = 0
        for param in self.params:
            if param.numel() == 0:
                continue
            if param.grad is not None and param.grad.is_sparse:
                raise NotImplementedError(
                    "agoq.gradient: sparse gradients (nn.Embedding(sparse=True)) are not supported by the 8-bit "
                    "all-reduce; use dense embeddings or set agoq.gradient.enabled=false"
                )
            bucket.append(param)
            size += param.numel()
            if size > limit:
                self._reduce_bucket(bucket, size, group, scale, comm_dtype)
                bucket, size = [], 0
        if bucket:
            self._reduce_bucket(bucket, size, group, scale, comm_dtype)

    def _reduce_bucket(
        self, bucket: list[nn.Parameter], size: int, group, scale: float, comm_dtype: torch.dtype
    ) -> None:
        flat = torch.zeros(size, dtype=torch.float32, device=bucket[0].device)
        offset = 0
        for param in bucket:
            local = self._unfold(param)
            if local is not None:
                flat[offset : offset + param.numel()].copy_(local)
            param.grad = None
            offset += param.numel()
        tag = self.agoq_store.seed(2)

        def write(start: int, end: int, reduced: torch.Tensor) -> None:
            flat[start:end].copy_(reduced)

        all_reduce_chunked(
            size,
            lambda start, end: flat[start:end],
            write,
            config=self.config.gradient,
            group=group,
            scale=scale,
            seed=lambda start: _mix(tag, start),
            comm_dtype=comm_dtype,
            counter=self.agoq_store.accounting.comm,
            kernels=self.agoq_store.kernels,
        )
        offset = 0
        for param in bucket:
            param.grad = flat[offset : offset + param.numel()].view(param.shape).to(param.dtype)
            offset += param.numel()

    def agoq_param_paths(self) -> dict[int, Path]:
        """Exact when the parameter's accumulator is fp32 and the whole reduction is below ``min_numel``
        (a bucket or chunk never holds more than every trainable parameter)."""
        total = sum(p.numel() for p in self.params)
        exact_reduction = reduction_exact(self.config.gradient, self.agoq_store.world_size, total)
        return {id(p): path(not isinstance(self._acc(p), Int8Accumulator), exact_reduction) for p in self.params}

    # --- step ----------------------------------------------------------------------------------

    def agoq_before_step(self) -> None:
        """A step that was never reduced (``no_sync``): DeepSpeed steps on the local sums."""
        if self.agoq_store.pending():
            self.agoq_materialize()

    def agoq_after_step(self, overflow: bool) -> None:
        """Snapshot the statistics, then the store's step boundary (``GradientHost.agoq_after_step``)."""
        self.agoq_store.note_buffers()
        super().agoq_after_step(overflow)

    # --- checkpointing -------------------------------------------------------------------------

    def layout(self) -> dict[str, Any]:
        """The figures a checkpoint's state must match: the trainable parameters' sizes."""
        return {"numels": [p.numel() for p in self.params]}

    def agoq_rank_state(self) -> dict[str, Any]:
        """``GradientStore.state()``: the step counter and the error-feedback residual per trainable
        parameter (by index), for a per-rank checkpoint file."""
        return self.agoq_store.state(**self.layout())

    def agoq_load_rank_state(self, state: dict[str, Any] | None) -> str | None:
        """Restore ``agoq_rank_state()``'s result; says why not (residuals from zero) when there is none
        or it was written for another layout (world size, group size, parameters)."""
        why = self.agoq_store.mismatch(state, **self.layout())
        if self.agoq_store.load_state(state, **self.layout()):
            return None
        return "no agoq state in the checkpoint" if state is None else why or "a residual does not fit"
