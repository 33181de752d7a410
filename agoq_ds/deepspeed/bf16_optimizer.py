"""``AgoqBF16Optimizer``: DeepSpeed's ``BF16_Optimizer`` with its gradient accumulation buffer held in
8 bits and reduced by the 8-bit all-reduce.

DeepSpeed 0.19.8 builds ``BF16_Optimizer`` for bf16 with ``data_types.grad_accum_dtype: fp32`` at ZeRO
stage 1 (plain and pipeline engines) and for bf16 pipelines at stage 0 (accumulating in bf16). Per
param group it keeps one flat gradient buffer as large as the group (``fp32_groups_gradients_flat``),
adds every micro-batch's bf16 gradients into it, all-reduces it at the boundary
(``engine.buffered_allreduce_fallback`` over ``get_grads_for_reduction()``) and reads per-parameter
views of it for the norm, the overflow check, clipping and the update of its fp32 master partition.

What changes (everything else is DeepSpeed's code):

* **Accumulation.** ``update_hp_grads`` / ``_update_hp_grad`` add the bf16 gradients into an
  ``Int8Accumulator`` per group over the same flat layout (int8 codes + one fp32 scale per
  ``group_size`` elements) instead of the flat buffer.
* **No buffer between steps.** The flat buffer and all its views (per-parameter gradients, the
  partition, the reduction list, ``lp._hp_grad``) are rebound to zero-stride zeros: they read 0, as
  DeepSpeed's cleared buffer does, and in-place writes raise instead of landing nowhere.
* **Reduction.** ``agoq_reduce`` (called by the AGoQ engine where DeepSpeed would all-reduce
  ``get_grads_for_reduction()``) dequantizes chunk by chunk, all-reduces each chunk in 8 bits and
  writes a freshly allocated buffer in the accumulation dtype; every view is rebound to it, so the
  step is DeepSpeed's own. ``clear_hp_grads`` (end of step, skipped step, ``zero_grad``) releases it.
"""

from __future__ import annotations

from typing import Any

import torch
from deepspeed import comm as dist
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.utils import logger

from ..config import AgoqConfig
from ..gradient.accumulator import Int8Accumulator
from ..gradient.allreduce import CHUNK_ELEMENTS, all_reduce_chunked, chunk_bounds
from ..gradient.paths import Path, path, reduction_exact
from ..seeding import mix_seed as _mix
from .optimizer_host import OptimizerHost


class AgoqBF16Optimizer(OptimizerHost, BF16_Optimizer):
    """``BF16_Optimizer`` with an int8 gradient accumulation buffer and 8-bit all-reduce.

    Constructed by DeepSpeed with its own arguments (see ``install.agoq_bf16_optimizer``); the agoq
    settings come from ``agoq_config=`` or from the class attribute set by ``bf16_optimizer_class``.
    """

    def __init__(self, *args: Any, agoq_config: AgoqConfig | None = None, **kwargs: Any) -> None:
        self._agoq_begin(BF16_Optimizer.__init__, args, kwargs, agoq_config, "bf16_optimizer")
        self._agoq_store8 = False
        self._agoq_live: dict[int, bool] = {}
        self._agoq_offsets: dict[int, list[int]] = {}
        super().__init__(*args, **kwargs)
        self._agoq_setup()

    # --- setup ---------------------------------------------------------------------------------

    def _agoq_setup(self) -> None:
        g = self.agoq_gradient
        cfg = self.agoq_config
        real = self.using_real_optimizer
        self._agoq_active = real and cfg.gradient_quantized
        self._agoq_store8 = real and cfg.gradient_store8
        self.agoq_engine_reduces = self._agoq_active
        self.agoq_description = (
            "8-bit all-reduce (reduce-scatter with fp32 sum + int8 all-gather)"
            if g.communication_bits == 8
            else "fp32 all-reduce"
        )
        if not self._agoq_store8:
            return
        for i, group in enumerate(self.bf16_groups):
            starts, total = [], 0
            for lp in group:
                starts.append(total)
                total += lp.numel()
            self._agoq_offsets[i] = starts
            self.agoq_store.add_per_step(i, self.fp32_groups_gradients_flat[i].numel(), release=False)
            self._agoq_release(i)
        if self.agoq_store.rank == 0:
            logger.info(
                f"agoq: BF16_Optimizer gradients: accumulation {g.storage_bits}-bit (stock: {self.grad_acc_dtype}), "
                f"all-reduce {g.communication_bits}-bit, group {g.group_size}, rounding {g.rounding}, "
                f"error feedback {g.error_feedback}"
            )

    def configure_autoep_folding_tp_gradient_reduction(self, folding_spec) -> None:
        """DeepSpeed's AutoEP folding correction edits the flat buffer in place: not supported."""
        if self._agoq_store8 and folding_spec is not None and folding_spec.tp_size > 1:
            raise ValueError("agoq.gradient: AutoEP folding with tensor parallelism is not supported (BF16_Optimizer)")
        super().configure_autoep_folding_tp_gradient_reduction(folding_spec)

    def agoq_param_paths(self) -> dict[int, Path]:
        """Exact when the param group's accumulator is fp32 and the group's all-reduce is below
        ``min_numel`` (the whole flat group is reduced in chunks)."""
        g, store = self.agoq_gradient, self.agoq_store
        paths = {}
        for i, group in enumerate(self.bf16_groups):
            storage_exact = not isinstance(store.step_accumulator(i), Int8Accumulator)
            exact_reduction = reduction_exact(g, store.world_size, self.fp32_groups_gradients_flat[i].numel())
            paths.update({id(lp): path(storage_exact, exact_reduction) for lp in group if lp.requires_grad})
        return paths

    # --- the flat buffer and its views ---------------------------------------------------------

    def _agoq_bind(self, i: int, flat: torch.Tensor) -> None:
        """Point every view DeepSpeed keeps of group ``i``'s gradient buffer at ``flat``."""
        numels = [lp.numel() for lp in self.bf16_groups[i]]
        self.fp32_groups_gradients_flat[i] = flat
        # The same list object is DeepSpeed's gradient_dict[i], which the hp-param links index lazily.
        self.fp32_groups_gradients[i][:] = self._split_flat_tensor(flat, numels)
        self.fp32_groups_actual_gradients_flat[i] = flat.narrow(0, 0, sum(numels))
        world = dist.get_world_size(group=self.real_dp_process_group[i])
        partition_id = dist.get_rank(group=self.real_dp_process_group[i])
        size = flat.numel() // world
        self.fp32_groups_gradient_flat_partition[i] = flat.narrow(0, partition_id * size, size)
        self.non_expert_gradients[i] = flat  # MoE groups are rejected, so index i is group i
        for j, lp in enumerate(self.bf16_groups[i]):
            if getattr(lp, "_hp_grad", None) is not None:
                lp._hp_grad = self.fp32_groups_gradients[i][j]

    def _agoq_release(self, i: int) -> None:
        numel = self.fp32_groups_gradients_flat[i].numel()
        device = self.fp32_groups_gradients_flat[i].device
        self._agoq_bind(i, torch.zeros((), dtype=self.grad_acc_dtype, device=device).expand(numel))
        self._agoq_live[i] = False

    def _agoq_materialize_group(self, i: int) -> None:
        acc = self.agoq_store.step_accumulator(i)
        flat = torch.empty(acc.numel, dtype=self.grad_acc_dtype, device=acc.device)
        for start, end in chunk_bounds(acc.numel, CHUNK_ELEMENTS, acc.group_size):
            flat[start:end].copy_(acc.dequantize_range(start, end))
        acc.reset()
        self._agoq_bind(i, flat)
        self._agoq_live[i] = True

    def agoq_materialize(self, params: Any = None) -> None:
        """Dequantize the accumulated (not yet reduced) gradients into a real buffer, without
        communicating: before the pipeline's tied-weight all-reduce, or a step that was not reduced
        (every group: the buffer is one per group, whichever ``params`` are asked for)."""
        for i, _ in self.agoq_store.per_step_items():
            if not self._agoq_live[i]:
                self._agoq_materialize_group(i)

    # --- accumulation --------------------------------------------------------------------------

    def _agoq_accumulate(self, i: int, items: list[tuple[int, torch.nn.Parameter]]) -> None:
        """Add the low-precision gradients of ``items`` (``(index in group, lp param)``) into the int8
        accumulator of group ``i``, at most ``CHUNK_ELEMENTS`` elements per requantization pass."""
        starts = self._agoq_offsets[i]
        batch: list[tuple[int, torch.nn.Parameter]] = []
        size = 0
        for j, lp in items:
            batch.append((j, lp))
            size += lp.numel()
            if size >= CHUNK_ELEMENTS:
                self._agoq_add(i, batch, starts)
                batch, size = [], 0
        if batch:
            self._agoq_add(i, batch, starts)

    def _agoq_add(self, i: int, batch: list[tuple[int, torch.nn.Parameter]], starts: list[int]) -> None:
        values = torch.cat([lp.grad.detach().reshape(-1) for _, lp in batch])
        positions = [(starts[j], lp.numel()) for j, lp in batch]
        self.agoq_store.step_accumulator(i).add_(values, positions, seed=self.agoq_store.seed(1, i))

    def _agoq_mark(self, i: int, j: int, lp: torch.nn.Parameter, clear_lp_grads: bool) -> None:
        lp._hp_grad = self.fp32_groups_gradients[i][j]
        self.fp32_groups_has_gradients[i][j] = True
        if clear_lp_grads:
            lp.grad.zero_()

    @torch.no_grad()
    def update_hp_grads(self, clear_lp_grads: bool = False) -> None:
        """Add every bf16 ``lp.grad`` into the int8 accumulator (DeepSpeed adds it into the flat buffer)."""
        if not self._agoq_store8 or any(self._agoq_live.values()):
            return super().update_hp_grads(clear_lp_grads=clear_lp_grads)
        if self.immediate_grad_update:
            return
        self.agoq_store.accounting.micro_steps += 1
        for i, group in enumerate(self.bf16_groups):
            items = [(j, lp) for j, lp in enumerate(group) if lp.grad is not None]
            self._agoq_accumulate(i, items)
            for j, lp in items:
                self._agoq_mark(i, j, lp, clear_lp_grads)

    @torch.no_grad()
    def _update_hp_grad(self, lp, group_idx, param_idx, clear_lp_grads) -> None:
        """One parameter's gradient (``immediate_grad_update`` hooks) into the int8 accumulator."""
        if not self._agoq_store8 or self._agoq_live.get(group_idx, False):
            return super()._update_hp_grad(lp, group_idx, param_idx, clear_lp_grads)
        if lp.grad is None:
            return
        self._agoq_accumulate(group_idx, [(param_idx, lp)])
        self._agoq_mark(group_idx, param_idx, lp, clear_lp_grads)

    def clear_hp_grads(self) -> None:
        """Drop the accumulated gradients and release the buffer (DeepSpeed zeroes it)."""
        if not self._agoq_store8:
            return super().clear_hp_grads()
        for i, acc in self.agoq_store.per_step_items():
            acc.reset()
            self._agoq_release(i)
        for i, group in enumerate(self.fp32_groups_gradients):
            self.fp32_groups_has_gradients[i] = [False] * len(group)

    # --- reduction -----------------------------------------------------------------------------

    def agoq_reduce(self, *, group, scale: float, comm_dtype: torch.dtype, elements_per_buffer: int = 0) -> None:
        """All-reduce every group's accumulated gradient over ``group`` (scaled by ``scale``) into the
        buffer the step reads; replaces DeepSpeed's all-reduce of ``get_grads_for_reduction()``."""
        self.agoq_store.note_buffers()
        for i, flat in enumerate(self.fp32_groups_gradients_flat):
            numel = flat.numel()
            if self._agoq_store8:
                acc = self.agoq_store.step_accumulator(i)
                source = flat if self._agoq_live[i] else None
                target = torch.empty(numel, dtype=self.grad_acc_dtype, device=flat.device)
            else:
                acc, source, target = None, flat, flat

            def read(start: int, end: int, acc=acc, source=source) -> torch.Tensor:
                return source[start:end] if source is not None else acc.dequantize_range(start, end)

            def write(start: int, end: int, reduced: torch.Tensor, target=target) -> None:
                target[start:end].copy_(reduced)

            tag = self.agoq_store.seed(2, i)
            all_reduce_chunked(
                numel,
                read,
                write,
                config=self.agoq_gradient,
                group=group,
                scale=scale,
                seed=lambda start, tag=tag: _mix(tag, start),
                comm_dtype=comm_dtype,
                counter=self.agoq_store.accounting.comm,
                kernels=self.agoq_store.kernels,
            )
            if acc is not None:
                acc.reset()
                self._agoq_bind(i, target)
                self._agoq_live[i] = True

    # --- step ----------------------------------------------------------------------------------

    def agoq_before_step(self) -> None:
        """Materialize what was never reduced (e.g. ``no_sync``: DeepSpeed steps on the local sums)."""
        if self.agoq_store.pending():
            self.agoq_materialize()
        self.agoq_store.note_buffers()

    # --- checkpointing -------------------------------------------------------------------------

    def _agoq_layout(self) -> dict[str, Any]:
        return {"dp_rank": self.agoq_store.rank, "numels": [acc.numel for _, acc in self.agoq_store.per_step_items()]}

    def state_dict(self) -> dict[str, Any]:
        """DeepSpeed's state dict plus ``STATE_KEY``: the step counter and the error-feedback residual
        of each group (int8 codes + fp32 scales), as plain tensors. Stock DeepSpeed ignores the key."""
        return self._agoq_with_state(super().state_dict())

    def load_state_dict(
        self,
        state_dict_list,
        checkpoint_folder=None,
        load_optimizer_states=True,
        load_from_fp32_weights=False,
        load_serial=None,
        param_shapes=None,
    ) -> None:
        """DeepSpeed's ``load_state_dict``; restores the agoq state when optimizer states are loaded from
        per-rank files written for the same layout, otherwise residuals start from zero."""
        state = self._agoq_saved_state(state_dict_list, load_optimizer_states, checkpoint_folder)
        super().load_state_dict(
            state_dict_list,
            checkpoint_folder=checkpoint_folder,
            load_optimizer_states=load_optimizer_states,
            load_from_fp32_weights=load_from_fp32_weights,
            load_serial=load_serial,
            param_shapes=param_shapes,
        )
        self._agoq_restore(state)
