"""``AgoqZeroOptimizer``: DeepSpeed's ZeRO stage 1/2 optimizer with 8-bit gradients.

What changes relative to ``DeepSpeedZeroOptimizer`` (everything else is DeepSpeed's own code):

* **Reduction.** ``average_tensor`` (a filled IPG bucket) and ``buffered_reduce_fallback`` (the
  non-contiguous path) reduce with ``reduce_scatter_8bit`` over DeepSpeed's owner map, or with
  ``all_reduce_8bit`` when ``zero_optimization.reduce_scatter`` is false. Averaging is applied in
  fp32 after the sum (``1 / (dp / sp)``, DeepSpeed's factor; the predivide factor only exists to
  keep fp16 sums from overflowing and cancels out of the result).
* **The owned partition.** The reduced slices a rank owns go straight into a per-param-group
  partition accumulator instead of ``grads_in_partition``/``all_grad_tensors``/the compact fp32
  buffer, one exchange round at a time (``reduce_scatter_8bit_rounds``: no fp32 copy of the rank's
  whole share of a bucket). Stage 2: int8 + per-block scales (+ 8-bit error-feedback residual) across micro-batches
  (``storage_bits: 8``), or fp32. Stage 1 reduces only at the accumulation boundary, so its
  partition accumulator is fp32 and lives from the reduction to ``step()``.
* **Stage 1 accumulation.** With ``storage_bits: 8`` a post-accumulate-grad hook folds every
  non-boundary ``param.grad`` into a per-param int8 accumulator (and frees it); the boundary is read
  from DeepSpeed's flag (the engine, or accelerate, sets it). ``get_gradient_for_reduction`` — the
  one place every stage-1 reduction path asks for a gradient — adds the accumulator back.
* **Step.** At the boundary ``averaged_gradients[i]`` becomes views over the dequantized fp32
  partition (the same structure as DeepSpeed's compact buffer), so the overflow check, the norm,
  clipping, ``safe_get_full_grad`` and the step work unchanged. Non-finite values dequantize to NaN.
* **ZeRO-Offload** (``offload_optimizer``): the partition accumulator is int8 at both stages and stays
  on the device across micro-batches; at the boundary its codes and scales cross to the host once
  (``gradient.offload.HostLink``) and are dequantized there into DeepSpeed's fp32 host gradient
  buffer, with the per-parameter norms and the overflow flag DeepSpeed's offloaded step reads.
  DeepSpeed's per-micro-step host round trips of accumulated gradients do not happen.
"""

from __future__ import annotations

from typing import Any

import torch
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer, GradPartitionBufferGroup
from deepspeed.utils import logger

from ..config import AgoqConfig
from ..gradient.accumulator import Int8Accumulator
from ..gradient.collectives import all_reduce_8bit, reduce_scatter_8bit_rounds, reduction_args
from ..gradient.offload import HostLink, stock_zero12_bytes
from ..gradient.paths import Path, largest_bucket, path, reduction_exact
from .layout import BucketLayout, bucket_layout, reduction_groups
from .optimizer_host import OptimizerHost


def _slices(flat: torch.Tensor, slices) -> list[torch.Tensor]:
    """Views of the ``(offset, numel)`` slices of a 1-D tensor."""
    return [flat.narrow(0, off, n) for off, n in slices]


def _local_pieces(layout: BucketLayout, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """The parts of this rank's slices (``layout.local``, concatenated) from element ``start`` to
    ``end``: ``(index into local, offset from start, partition offset, numel)``."""
    out, position = [], 0
    for k, (_, offset, n) in enumerate(layout.local):
        lo, hi = max(start, position), min(end, position + n)
        if lo < hi:
            out.append((k, lo - start, offset + lo - position, hi - lo))
        position += n
        if position >= end:
            break
    return out


class AgoqZeroOptimizer(OptimizerHost, DeepSpeedZeroOptimizer):
    """``DeepSpeedZeroOptimizer`` (ZeRO stage 1 and 2) with 8-bit gradient communication and storage.

    Constructed by DeepSpeed with its own arguments (see ``install.agoq_zero_optimizer``); the agoq
    settings come from ``agoq_config=`` or from the class attribute set by ``install.optimizer_class``.
    """

    def __init__(self, *args: Any, agoq_config: AgoqConfig | None = None, **kwargs: Any) -> None:
        self._agoq_begin(DeepSpeedZeroOptimizer.__init__, args, kwargs, agoq_config, "zero12")
        self._agoq_hook_handles: list[Any] = []
        super().__init__(*args, **kwargs)
        self._agoq_setup()

    # --- setup ---------------------------------------------------------------------------------

    def _agoq_setup(self) -> None:
        g = self.agoq_gradient
        self._agoq_comm8 = self.agoq_config.gradient_comm8
        self._agoq_store8 = self.agoq_config.gradient_store8
        self._agoq_active = self._agoq_comm8 or self._agoq_store8
        self.agoq_description = (
            f"{g.communication_bits}-bit reduce-scatter (all-to-all exchange, fp32 sum)"
            if self._agoq_comm8
            else "DeepSpeed's own reduction"
        )
        if not self._agoq_active:
            return
        store = self.agoq_store
        # With offload the partition crosses to the host in 8 bits, so it is int8 at stage 1 too.
        quantized = self._agoq_store8 and (self.partition_gradients or self.cpu_offload)
        for i in range(len(self.bit16_groups)):
            # int8 at stage 2, freed after each step: between steps stock DeepSpeed holds no gradient
            # buffer either. Stage 1 only holds an fp32 partition from the boundary reduction to step().
            release = quantized or not self.partition_gradients
            store.add_per_step(i, int(self.partition_size[i]), quantized=quantized, release=release)
        self._agoq_host_link = None
        self._agoq_reduced: set[int] = set()
        """Ids of the parameters reduced since the last boundary (offload: the ones with a norm)."""
        if self.cpu_offload:
            pin = get_accelerator().pin_memory if self.cpu_offload_pin_memory else None
            self._agoq_host_link = HostLink(pin=pin, kernels=store.kernels, meter=store.accounting.offload)
        if not self.partition_gradients and self._agoq_store8:
            for group in self.bit16_groups:
                for param in group:
                    if param.requires_grad:
                        store.add_carried(self.get_param_id(param), param.numel())
                        self._agoq_hook_handles.append(param.register_post_accumulate_grad_hook(self._agoq_fold))
        if store.rank == 0:
            logger.info(
                f"agoq: {self.zero_stage_string} gradients: communication {g.communication_bits}-bit, storage "
                f"{g.storage_bits}-bit, group {g.group_size}, rounding {g.rounding}, error feedback {g.error_feedback}"
            )

    def destroy(self) -> None:
        """Remove agoq's hooks, then DeepSpeed's."""
        for handle in self._agoq_hook_handles:
            handle.remove()
        self._agoq_hook_handles.clear()
        super().destroy()

    # --- stage 1: int8 accumulation of full gradients --------------------------------------------

    def _agoq_fold(self, param: torch.nn.Parameter) -> None:
        """Post-accumulate-grad hook: move a non-boundary gradient into its int8 accumulator."""
        if param.grad is None or self.is_gradient_accumulation_boundary():
            return
        acc = self.agoq_store.fold_accumulator(self.get_param_id(param))
        acc.add_(param.grad.detach().reshape(-1), seed=self.agoq_store.seed(1))
        param.grad = None

    def _agoq_unfold(self, param: torch.nn.Parameter) -> None:
        """Add a parameter's int8 folds back where DeepSpeed reads its gradient for the reduction:
        ``param.grad``, or ``param.grad_accum`` where DeepSpeed accumulates in a wider dtype (ZeRO-1 with
        ``grad_accum_dtype`` fp32 and offload, ``use_grad_accum_attribute``: ``backward_epilogue`` has
        moved the last micro-batch's gradient there)."""
        acc = self.agoq_store.fold_accumulator(self.get_param_id(param))
        if acc is None or not acc.has_value:
            return
        total = acc.take().view(param.shape)  # owned: reset must not zero what param.grad becomes
        if self.use_grad_accum_attribute:
            if param.grad_accum is None:
                param.grad_accum = total.to(self.gradient_accumulation_dtype)
            else:
                param.grad_accum.add_(total.view(param.grad_accum.shape))
            return
        if param.grad is not None:
            total += param.grad.float()
        param.grad = total.to(param.dtype)

    def get_gradient_for_reduction(self, param: torch.nn.Parameter) -> torch.Tensor | None:
        """DeepSpeed's gradient for reduction, with a stage-1 int8 accumulator added back first."""
        if self.agoq_store.folds:
            self._agoq_unfold(param)
        return super().get_gradient_for_reduction(param)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """DeepSpeed's ``zero_grad``; stage-1 accumulated gradients are dropped with ``param.grad``."""
        super().zero_grad(set_to_none=set_to_none)
        self.agoq_store.reset_carried()

    # --- reduction -----------------------------------------------------------------------------

    def _use_compact_grad_partition_buffer(self, group_idx: int) -> bool:
        if getattr(self, "_agoq_active", False):
            return False  # the partition accumulator replaces DeepSpeed's compact fp32 buffer
        return super()._use_compact_grad_partition_buffer(group_idx)

    def _agoq_stream(self, communication_data_type: torch.dtype):
        """The stream DeepSpeed's ``average_tensor`` reduces on, with the same waits."""
        accelerator = get_accelerator()
        if not self.overlap_comm:
            return accelerator.current_stream()
        stream = self.reduction_stream
        if not accelerator.resolves_data_dependency():
            producers = self.ipg_buckets[communication_data_type].copy_streams or {accelerator.current_stream()}
            for producer in producers:
                stream.wait_stream(producer)
            accelerator.current_stream().wait_stream(stream)
        return stream

    def _agoq_average_factor(self) -> float:
        if not self.gradient_average:
            return 1.0
        return 1.0 / (self.agoq_store.world_size / float(self.sequence_parallel_size))

    def _agoq_reduce(self, flat: torch.Tensor, communication_data_type: torch.dtype, stock_reduce) -> None:
        """Reduce one bucket (``flat`` laid out like the bucket) and store this rank's slices: over the
        data-parallel group, and with MoE layers each expert param group's slices over its
        expert-data-parallel group (``reduction_groups``), averaged by DeepSpeed's one factor."""
        bucket = self.ipg_buckets[communication_data_type]
        self._agoq_reduced.update(param_id for _, _, param_id in bucket.params)
        if not self._agoq_comm8:
            stock_reduce()  # DeepSpeed's own reduction, expert groups included
        for process_group, members in reduction_groups(self, bucket.params):
            world, rank = dist.get_world_size(group=process_group), dist.get_rank(group=process_group)
            layout = bucket_layout(self, bucket.params, world, rank, groups=members)
            if layout.numel:
                self._agoq_reduce_group(flat, layout, process_group, world, rank, communication_data_type)

    def _agoq_reduce_group(
        self,
        flat: torch.Tensor,
        layout: BucketLayout,
        process_group: Any,
        world: int,
        rank: int,
        communication_data_type: torch.dtype,
    ) -> None:
        store = self.agoq_store
        counter = store.accounting.comm
        counter.add_baseline(layout.numel, world)
        if not self._agoq_comm8:
            counter.add_stock(layout.numel, world, flat.element_size())
            self._agoq_store_owned(_slices(flat, layout.owner_map[rank]), layout)  # views: no copy
            return
        kwargs = reduction_args(
            self.agoq_gradient,
            scale=self._agoq_average_factor(),
            seed=store.seed(2),
            counter=counter,
            kernels=store.kernels,
        )
        kwargs["group"] = process_group
        with get_accelerator().stream(self._agoq_stream(communication_data_type)):
            if self.reduce_scatter and world == 1 and kwargs["scale"] == 1.0:
                # Nothing to exchange: the int8 store reads the bucket's own slices, chunk by chunk
                # (reduce_scatter_8bit would concatenate them: a copy of the bucket).
                owned = _slices(flat, layout.owner_map[rank])
            elif self.reduce_scatter:
                # Stored round by round: no fp32 copy of this rank's whole share of the bucket.
                start = 0
                for part in reduce_scatter_8bit_rounds(flat, layout.owner_map, **kwargs):
                    self._agoq_store_owned(part.values, layout, start)
                    start += part.values.numel()
                return
            else:  # one data-parallel group here: MoE with reduce_scatter=false is refused
                full = all_reduce_8bit(flat, **kwargs)
                flat.copy_(full)  # DeepSpeed's all-reduce path leaves the whole bucket reduced
                owned = _slices(full, layout.owner_map[rank])
            self._agoq_store_owned(owned, layout)

    def _agoq_store_owned(self, owned: torch.Tensor | list[torch.Tensor], layout: BucketLayout, start: int = 0) -> None:
        """Add this rank's slices to the partition accumulators, one view per slice: ``owned`` is one
        view per slice, or consecutive values of the slices concatenated starting ``start`` elements
        into them (one exchange round). Nothing bucket-sized is concatenated."""
        if isinstance(owned, torch.Tensor):
            owned_pieces = _local_pieces(layout, start, start + owned.numel())
            values = {k: owned.narrow(0, at, n) for k, at, _, n in owned_pieces}
            by_group: dict[int, tuple[list[int], list[tuple[int, int]]]] = {}
            for k, _, offset, n in owned_pieces:
                idx, pos = by_group.setdefault(layout.local[k][0], ([], []))
                idx.append(k)
                pos.append((offset, n))
        else:
            values = dict(enumerate(owned))
            by_group = layout.local_by_group()
        link = self._agoq_host_link if self.is_gradient_accumulation_boundary() else None
        for group, (indices, positions) in by_group.items():
            acc = self.agoq_store.step_accumulator(group)
            acc.add_([values[k] for k in indices], positions, seed=self.agoq_store.seed(3, group))
            if link is not None:  # offload: the groups now final cross to the host while backward runs on
                link.written(group, acc, self.single_partition_of_fp32_groups[group].grad.view(-1), positions)

    def average_tensor(self, tensor: torch.Tensor, communication_data_type: torch.dtype):
        """Reduce a filled IPG bucket: 8-bit reduce-scatter into the partition accumulator."""
        if not self._agoq_active:
            return super().average_tensor(tensor, communication_data_type)
        self._agoq_reduce(
            tensor,
            communication_data_type,
            lambda: super(AgoqZeroOptimizer, self).average_tensor(tensor, communication_data_type),
        )

    def buffered_reduce_fallback(
        self, rank, grads, communication_data_type: torch.dtype, elements_per_buffer=500000000, log=None
    ):
        """The non-contiguous-gradients reduction of a bucket's grads, through the 8-bit path."""
        if not self._agoq_active:
            return super().buffered_reduce_fallback(rank, grads, communication_data_type, elements_per_buffer, log)
        if not grads:
            return
        dtype = grads[0].dtype if all(g.dtype == grads[0].dtype for g in grads) else torch.float32

        def flatten() -> torch.Tensor:
            return torch.cat([g.reshape(-1).to(dtype) for g in grads])

        flat = flatten()
        if self._agoq_comm8:
            self._agoq_reduce(flat, communication_data_type, None)
        else:

            def stock_reduce() -> None:
                super(AgoqZeroOptimizer, self).buffered_reduce_fallback(
                    rank, grads, communication_data_type, elements_per_buffer, log
                )
                flat.copy_(flatten())

            self._agoq_reduce(flat, communication_data_type, stock_reduce)

    def copy_grads_in_partition(self, param: torch.nn.Parameter, group_idx: int | None = None) -> None:
        """The owned slices are already in the partition accumulator: just drop the bucket view."""
        if not self._agoq_active:
            return super().copy_grads_in_partition(param, group_idx)
        self.clear_grad_attribute(param)

    # --- boundary and step ---------------------------------------------------------------------

    def _agoq_partition_views(self, group_idx: int, flat: torch.Tensor) -> GradPartitionBufferGroup:
        """Per-param views of a flat partition, with padding entries, like DeepSpeed's compact buffer."""
        partition_size = int(self.partition_size[group_idx])
        partition_id = dist.get_rank(group=self.real_dp_process_group[group_idx])
        views, current = [], 0
        for param in self.params_in_partition[group_idx]:
            param_id = self.get_param_id(param)
            source = int(self.grad_start_offset[group_idx][partition_id][param_id])
            dest = int(self.grad_partition_insertion_offset[group_idx][partition_id][param_id])
            numel = int(min(param.numel() - source, partition_size - dest))
            if dest > current:
                pad = flat.narrow(0, current, dest - current)
                pad._zero_padding = True
                views.append(pad)
                current = dest
            if numel > 0:
                view = flat.narrow(0, dest, numel)
                if source == 0 and numel == param.numel():
                    view = view.view(param.shape)
                views.append(view)
                current = dest + numel
        if current < partition_size:
            pad = flat.narrow(0, current, partition_size - current)
            pad._zero_padding = True
            views.append(pad)
        return GradPartitionBufferGroup(views, flat)

    def _agoq_materialize(self) -> None:
        """Point ``averaged_gradients`` at the dequantized partitions (fp32) for the step; with offload,
        fill DeepSpeed's host gradient buffers instead."""
        self._agoq_note_buffers()
        if self._agoq_host_link is not None:
            self._agoq_offload_partitions()
            return
        for i, acc in self.agoq_store.per_step_items():
            self.averaged_gradients[i] = self._agoq_partition_views(i, acc.dequantize())

    def _agoq_offload_partitions(self) -> None:
        """Send each partition to the host (int8 codes and scales, one copy per step), dequantize it
        there into ``single_partition_of_fp32_groups[i].grad``, and leave what DeepSpeed's offloaded
        step reads: each owned parameter's gradient norm and the local overflow flag."""
        link, store = self._agoq_host_link, self.agoq_store
        destinations = {i: self.single_partition_of_fp32_groups[i].grad.view(-1) for i, _ in store.per_step_items()}
        for i, acc in store.per_step_items():
            link.send(i, acc, destinations[i])
        link.wait()
        owned = touched = 0
        for i, acc in store.per_step_items():
            grad = destinations[i]
            link.receive(i, acc, grad)
            for param in self.params_in_partition[i]:
                param_id = self.get_param_id(param)
                _, _, dest_offset, numel = self.grad_position[param_id]
                if param_id in self._agoq_reduced:
                    # As stock's offload path: a parameter without a gradient this step has no norm, so
                    # that DeepSpeed's ignore_unused_parameters check sees it.
                    self.norm_for_param_grads[param_id] = grad.narrow(0, int(dest_offset), int(numel)).norm(2)
                owned, touched = owned + int(numel), touched + param.numel()
            if not bool(torch.isfinite(grad).all()):  # host memory: no device synchronisation
                self.local_overflow = True
        self._agoq_reduced.clear()
        meter = store.accounting.offload
        meter.baseline_bytes += stock_zero12_bytes(
            owned_numel=owned,
            touched_numel=touched,
            grad_element_size=self.bit16_groups[0][0].element_size() if self.bit16_groups[0] else 2,
            micro_steps=store.accounting.micro_steps,
            partitioned=self.partition_gradients,
        )

    def independent_gradient_partition_epilogue(self) -> None:
        """DeepSpeed's epilogue without its own partition buffers; at the boundary, materialize."""
        if not self._agoq_active:
            return super().independent_gradient_partition_epilogue()
        self.reduce_ipg_grads()
        for i in range(len(self.params_already_reduced)):
            self.params_already_reduced[i] = False
        if self.overlap_comm:
            if not get_accelerator().resolves_data_dependency():
                get_accelerator().synchronize()
            self._clear_previous_reduced_grads()
        if self.is_gradient_accumulation_boundary():
            self._agoq_materialize()
        self._release_ipg_buffers()
        self._clear_param_grad_only()
        self._epilogue_ran_this_backward = True

    def finalize_gradient_accumulation_boundary(self) -> None:
        """Unmanaged accumulation: materialize the partitions for ``step()``."""
        if not self._agoq_active:
            return super().finalize_gradient_accumulation_boundary()
        self.set_gradient_accumulation_boundary(True)
        self._agoq_materialize()

    def agoq_before_step(self) -> None:
        """Note the buffer bytes (the boundary epilogue has materialized the partitions)."""
        self._agoq_note_buffers()

    # --- statistics ----------------------------------------------------------------------------

    def agoq_param_paths(self) -> dict[int, Path]:
        """Stage 2: exact when the param group's partition accumulator is fp32 and the param's bucket
        stays below ``min_numel``; stage 1: the per-parameter fold accumulator instead of the partition
        (which is fp32 from the boundary reduction to ``step()``), and with offload both (the partition
        crosses to the host in int8)."""
        g, store = self.agoq_gradient, self.agoq_store
        params = [(i, p) for i, group in enumerate(self.bit16_groups) for p in group if p.requires_grad]
        total = sum(p.numel() for _, p in params)
        paths = {}
        for i, param in params:
            held = [store.step_accumulator(i)] if self.partition_gradients or self.cpu_offload else []
            if not self.partition_gradients:
                held.append(store.fold_accumulator(self.get_param_id(param)))
            largest = largest_bucket(param.numel(), self.reduce_bucket_size, total)
            exact_reduction = not self._agoq_comm8 or reduction_exact(g, store.world_size, largest)
            exact_storage = not any(isinstance(acc, Int8Accumulator) for acc in held)
            paths[id(param)] = path(exact_storage, exact_reduction)
        return paths

    def backward_prologue(self, *args: Any, **kwargs: Any) -> Any:
        """Counts micro-steps for the statistics."""
        self.agoq_store.accounting.micro_steps += 1
        return super().backward_prologue(*args, **kwargs)

    def _agoq_note_buffers(self) -> None:
        """Record the gradient-buffer bytes now held (the accumulators only grow within a step); a
        stage-1 partition with int8 folds is transient (it exists only during ``step()``)."""
        store = self.agoq_store
        store.note_buffers(per_step=self.partition_gradients or not store.folds)

    # --- checkpointing -------------------------------------------------------------------------

    def _agoq_layout(self) -> dict[str, Any]:
        return {"stage": 2 if self.partition_gradients else 1}

    def state_dict(self) -> dict[str, Any]:
        """DeepSpeed's state dict plus ``STATE_KEY``: the error-feedback residuals (int8 codes and
        fp32 scales per partition or param) and the step counter, as plain tensors and dicts."""
        return self._agoq_with_state(super().state_dict())

    def load_state_dict(
        self,
        state_dict_list,
        load_optimizer_states=True,
        load_from_fp32_weights=False,
        checkpoint_folder=None,
        load_serial=None,
        param_shapes=None,
    ) -> None:
        """DeepSpeed's ``load_state_dict``; restores the agoq residuals when optimizer states are loaded
        and the checkpoint has them for the same layout (stage, world size, group size), otherwise
        starts them from zero (a stock DeepSpeed checkpoint, a universal checkpoint, a new layout)."""
        state = self._agoq_saved_state(state_dict_list, load_optimizer_states, checkpoint_folder)
        super().load_state_dict(
            state_dict_list,
            load_optimizer_states=load_optimizer_states,
            load_from_fp32_weights=load_from_fp32_weights,
            checkpoint_folder=checkpoint_folder,
            load_serial=load_serial,
            param_shapes=param_shapes,
        )
        self._agoq_restore(state)
