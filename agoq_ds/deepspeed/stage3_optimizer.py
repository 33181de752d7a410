"""``AgoqStage3Optimizer``: DeepSpeed's ZeRO stage 3 optimizer with 8-bit gradients.

What changes relative to ``DeepSpeedZeroOptimizer_Stage3`` (everything else is DeepSpeed's own code):

* **Reduction.** A filled IPG bucket is reduce-scattered by ``reduce_scatter_8bit`` (int8 codes with
  one fp32 scale per ``group_size`` elements on the wire, fp32 summation at the owner) instead of
  DeepSpeed's bf16/fp32 ``reduce_scatter_coalesced``. Each parameter's gradient is split as DeepSpeed
  partitions it (``ds_tensor``: ``partition_numel`` elements per rank, the last rank's padded); a
  rank's slices arrive in the order of its flat gradient partition, averaged by ``1 / world``.
* **The gradient partition.** DeepSpeed keeps a persistent fp32 ``grad_partitions_flat_buffer`` (the
  sum of the micro-batches' partitions). Here that sum is an int8 accumulator with error feedback
  (``storage_bits: 8``), freed after every step; the fp32 buffer exists only from the accumulation
  boundary to the end of ``step()``, when the accumulator is dequantized into it. The overflow check,
  the norm, clipping, ``safe_get_full_grad`` and the step read it unchanged. Non-finite values
  dequantize to NaN.
* **Accounting.** The same meter as stages 0-2; the baseline is DeepSpeed's ring reduce-scatter.
* **ZeRO-Offload / ZeRO-Infinity** (``offload_optimizer``; ``offload_param`` changes nothing here): the
  int8 partition stays on the device across micro-batches; at the boundary its codes and scales cross
  to the host once (``gradient.offload.HostLink``), are dequantized there into an fp32 host partition
  (which the overflow check reads, as stock's host partition), and each parameter's slice is copied
  into the optimizer's fp32 host gradient, with its norm.
  DeepSpeed's per-micro-step device<->host round trips of the running sum do not happen.

Limits, by design: DeepSpeed's gradient accessors (``safe_get_full_grad``, the tensor-fragment API)
read the fp32 partition from the accumulation boundary to the end of ``step()``; outside that window
they read zeros (stock: the running sum) and writes raise. From the boundary to the end of the step a
rank holds the int8 partition beside the fp32 one (``buffer_bytes`` counts the int8 storage across
micro-batches, as at ZeRO-2). With reentrant activation checkpointing the boundary epilogue runs once
per backward phase, and each one dequantizes the partition again.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.utils import logger

from ..config import AgoqConfig
from ..gradient.accumulator import Int8Accumulator
from ..gradient.collectives import reduce_scatter_8bit_rounds, reduction_args, sub_slices
from ..gradient.offload import HostLink, stock_zero3_bytes
from ..gradient.paths import Path, largest_bucket, path, reduction_exact
from .optimizer_host import OptimizerHost

_MANGLED = "_DeepSpeedZeroOptimizer_Stage3__"
_PARTITION = "partition"
_STORED = "stored"
"""``_agoq_owned`` after ``_agoq_scatter``: the bucket's reduced slices are in the partition already."""


class AgoqStage3Optimizer(OptimizerHost, DeepSpeedZeroOptimizer_Stage3):
    """``DeepSpeedZeroOptimizer_Stage3`` with 8-bit gradient reduce-scatter and int8 partition storage.

    Constructed by DeepSpeed with its own arguments (see ``install.agoq_stage3_optimizer``); the agoq
    settings come from ``agoq_config=`` or from the class attribute set by ``stage3_optimizer_class``.
    """

    def __init__(self, *args: Any, agoq_config: AgoqConfig | None = None, **kwargs: Any) -> None:
        self._agoq_begin(DeepSpeedZeroOptimizer_Stage3.__init__, args, kwargs, agoq_config, "zero3")
        self._agoq_owned: str | None = None
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
            else "DeepSpeed's own reduce-scatter"
        )
        if not self._agoq_active:
            return
        self._agoq_params = list(itertools.chain.from_iterable(self.fp16_groups))
        # Where each parameter's gradient partition sits in the flat partition (DeepSpeed's own walk).
        self._agoq_offsets: dict[int, int] = {}
        offset = 0
        for param in self._agoq_params:
            self._agoq_offsets[param.ds_id] = offset
            offset += param.partition_numel()
        self._agoq_numel = offset
        self._agoq_partition = self.agoq_store.add_per_step(_PARTITION, offset, quantized=self._agoq_store8)
        self._agoq_host_link = None
        if self.offload_optimizer:
            store = self.agoq_store
            pin = get_accelerator().pin_memory if self.offload_optimizer_pin_memory else None
            self._agoq_host_link = HostLink(pin=pin, kernels=store.kernels, meter=store.accounting.offload)
            self._agoq_host_flat = torch.zeros(offset, dtype=torch.float32)
        self._agoq_release()
        if self.agoq_store.rank == 0:
            logger.info(
                f"agoq: ZeRO-3 gradients: reduce-scatter {g.communication_bits}-bit, partition storage "
                f"{g.storage_bits}-bit, group {g.group_size}, rounding {g.rounding}, error feedback {g.error_feedback}"
            )

    def agoq_param_paths(self) -> dict[int, Path]:
        """Exact when the flat partition accumulator is fp32 and the parameter's bucket stays below
        ``min_numel``."""
        g, store = self.agoq_gradient, self.agoq_store
        params = [p for p in self._agoq_params if p.requires_grad]
        total = sum(p.ds_numel for p in params)
        storage_exact = not isinstance(self._agoq_partition, Int8Accumulator)
        return {
            id(p): path(
                storage_exact,
                not self._agoq_comm8
                or reduction_exact(g, store.world_size, largest_bucket(p.ds_numel, self.reduce_bucket_size, total)),
            )
            for p in params
        }

    # --- the flat partition buffer and its views -----------------------------------------------

    def _agoq_bind(self, flat: torch.Tensor) -> None:
        """Point DeepSpeed's flat gradient partition and its per-parameter views at ``flat``."""
        self.grad_partitions_flat_buffer = flat
        views = getattr(self, _MANGLED + "param_id_to_grad_partition")
        for param in self._agoq_params:
            views[param.ds_id] = flat.narrow(0, self._agoq_offsets[param.ds_id], param.partition_numel())
        self._agoq_live = flat.stride(0) != 0

    def _agoq_release(self) -> None:
        """Between steps no fp32 partition exists: the views read zeros from a 0-byte tensor."""
        zero = torch.zeros((), dtype=self.gradient_accumulation_dtype, device=self.device)
        self._agoq_bind(zero.expand(self._agoq_numel))

    def _agoq_materialize(self) -> None:
        """Dequantize the accumulated partition into the fp32 buffer the step reads."""
        self.agoq_store.note_buffers()
        if self._agoq_host_link is not None:
            self._agoq_offload_partition()
            return
        flat = self._agoq_partition.dequantize().to(self.gradient_accumulation_dtype)
        if not get_accelerator().resolves_data_dependency():
            # DeepSpeed's overflow check reads the buffer on the reduce stream (stock writes it there).
            self.reduce_and_partition_stream.wait_stream(get_accelerator().current_stream())
        self._agoq_bind(flat)
        views = getattr(self, _MANGLED + "param_id_to_grad_partition")
        for i, sub_group in enumerate(self.fp16_groups):
            self.averaged_gradients[i] = [
                views[p.ds_id] if p.requires_grad else torch.zeros_like(p.ds_tensor) for p in sub_group
            ]

    def _agoq_offload_partition(self) -> None:
        """Send the partition to the host (int8 codes and scales, once per step), dequantize it there,
        and fill what DeepSpeed's offloaded step reads: each sub-group's fp32 host gradient and each
        parameter's gradient norm (NVMe optimizer swap is refused: ``unsupported.py``)."""
        link, acc, host = self._agoq_host_link, self._agoq_partition, self._agoq_host_flat
        link.send(_PARTITION, acc, host)
        link.wait()
        link.receive(_PARTITION, acc, host)
        self._agoq_bind(host)  # the overflow check reads the host partition, as stock's offload does
        for param in self._agoq_params:
            if not param.requires_grad:
                continue
            param_id = self.get_param_id(param)
            group, dest_offset, numel = self.grad_position[param_id]
            grad = host.narrow(0, self._agoq_offsets[param.ds_id], numel)
            self.norm_for_param_grads[param_id] = grad.norm(2)
            self.fp32_partitioned_groups_flat[group].grad.narrow(0, dest_offset, numel).copy_(grad)
        rank = self.agoq_store.rank
        reduced = sum(
            max(0, min(p.partition_numel(), p.ds_numel - rank * p.partition_numel())) for p in self._agoq_params
        )
        self.agoq_store.accounting.offload.baseline_bytes += stock_zero3_bytes(
            numel=reduced,
            accumulation_element_size=self.gradient_accumulation_dtype.itemsize,
            micro_steps=self.agoq_store.accounting.micro_steps,
        )

    # --- reduction -----------------------------------------------------------------------------

    def _agoq_flat(self, params: list[torch.nn.Parameter], communication_data_type: torch.dtype):
        """The bucket's gradients as one flat tensor and each one's offset in it: DeepSpeed's contiguous
        bucket buffer itself when every gradient is a view of it, else a concatenation."""
        grads = [p.grad.reshape(-1) for p in params]
        buffer = getattr(self.ipg_buckets[communication_data_type], "buffer", None)
        if buffer is not None and all(
            g.dtype == buffer.dtype and g.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
            for g in grads
        ):
            base, size = buffer.data_ptr(), buffer.element_size()
            offsets = [(g.data_ptr() - base) // size for g in grads]
            end = max(o + g.numel() for o, g in zip(offsets, grads, strict=True))
            return buffer.narrow(0, 0, end), offsets
        dtype = grads[0].dtype if all(g.dtype == grads[0].dtype for g in grads) else torch.float32
        offsets = list(itertools.accumulate((g.numel() for g in grads[:-1]), initial=0))
        return torch.cat([g.to(dtype) for g in grads]), offsets

    def _agoq_scatter(
        self, params: list[torch.nn.Parameter], communication_data_type: torch.dtype, *, contiguous: bool = False
    ) -> list:
        """8-bit reduce-scatter of a bucket; this rank's averaged slices go into the partition accumulator
        round by round (``partition_grads`` then only frees the gradients).

        Averaged as DeepSpeed averages that path: by the averaging world size (the whole data-parallel
        group for AutoEP experts), and on the all-reduce path (``contiguous``) over the sequence-parallel
        size too."""
        group = self._get_param_partition_group(params[0])
        world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
        divisor = float(self._gradient_averaging_world_size(params, world))
        if contiguous:
            divisor /= float(self.sequence_parallel_size)
        flat, offsets = self._agoq_flat(params, communication_data_type)
        # Per destination: (partition offset, bucket offset, numel), sorted into partition order.
        slices: list[list[tuple[int, int, int]]] = [[] for _ in range(world)]
        for param, start in zip(params, offsets, strict=True):
            chunk, total = param.partition_numel(), param.ds_numel
            where = self._agoq_offsets[param.ds_id]
            for dest in range(world):
                lo, hi = min(dest * chunk, total), min((dest + 1) * chunk, total)
                if hi > lo:
                    slices[dest].append((where, start + lo, hi - lo))
        for own in slices:
            own.sort()
        numel = sum(p.ds_numel for p in params)
        store = self.agoq_store
        counter = store.accounting.comm
        counter.add_baseline(numel, world, reduce_scatter=True)
        args = reduction_args(
            self.agoq_gradient, scale=1.0 / divisor, seed=store.seed(2), counter=counter, kernels=store.kernels
        )
        positions = [(where, n) for where, _, n in slices[rank]]
        start = 0
        # Stored round by round: no fp32 copy of this rank's whole share of the bucket.
        owner_map = [[(o, n) for _, o, n in own] for own in slices]
        for part in reduce_scatter_8bit_rounds(flat, owner_map, group=group, **args):
            end = start + part.values.numel()
            self._agoq_store(part.values, sub_slices(positions, start, end))
            start = end
        self._agoq_owned = _STORED
        return []

    def _DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads(self, params_to_reduce, communication_data_type):
        """DeepSpeed's bucket reduce-scatter, through the 8-bit path when it is on."""
        if not self._agoq_comm8:
            parts = super()._DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads(params_to_reduce, communication_data_type)
            self._agoq_count_stock(params_to_reduce, communication_data_type, reduce_scatter=True)
            return parts
        return self._agoq_scatter(params_to_reduce, communication_data_type)

    def _DeepSpeedZeroOptimizer_Stage3__avg_scatter_contiguous_grads(self, buffer_to_reduce, communication_data_type):
        """DeepSpeed's all-reduce path (``reduce_scatter: false``): the 8-bit reduce-scatter gives the
        same partitions for a quarter of the bytes."""
        params = self.ipg_buckets[communication_data_type].params
        if not self._agoq_comm8:
            parts = super()._DeepSpeedZeroOptimizer_Stage3__avg_scatter_contiguous_grads(
                buffer_to_reduce, communication_data_type
            )
            self._agoq_count_stock(params, communication_data_type, reduce_scatter=False)
            return parts
        return self._agoq_scatter(list(params), communication_data_type, contiguous=True)

    def _agoq_count_stock(self, params, communication_data_type: torch.dtype, *, reduce_scatter: bool) -> None:
        """Count a reduction DeepSpeed did itself (``communication_bits: 32``) with the same meter."""
        group = self._get_param_partition_group(params[0])
        world = dist.get_world_size(group=group)
        numel = sum(p.ds_numel for p in params)
        counter = self.agoq_store.accounting.comm
        counter.add_baseline(numel, world, reduce_scatter=True)
        counter.add_stock(numel, world, communication_data_type.itemsize, all_reduce=not reduce_scatter)

    def _agoq_store(self, values: torch.Tensor, positions: list[tuple[int, int]]) -> None:
        """Add reduced values (concatenated in ``positions`` order) to the partition accumulator; with
        offload, the groups now final cross to the host while backward runs on."""
        if not values.numel():
            return
        self._agoq_partition.add_(values, positions, seed=self.agoq_store.seed(3))
        link = self._agoq_host_link
        if link is not None and self.is_gradient_accumulation_boundary():
            link.written(_PARTITION, self._agoq_partition, self._agoq_host_flat, positions)

    def partition_grads(self, params_to_release: list[torch.nn.Parameter], grad_partitions: list[torch.Tensor]):
        """Add this rank's reduced slices to the partition accumulator and free the bucket's gradients."""
        if not self._agoq_active:
            return super().partition_grads(params_to_release, grad_partitions)
        if self._agoq_owned is _STORED:  # ``_agoq_scatter`` stored the reduced slices already
            values, positions = None, []
            self._agoq_owned = None
        else:  # DeepSpeed reduced (communication_bits: 32): its padded per-parameter partitions
            kept = [
                (param, part)
                for param, part in zip(params_to_release, grad_partitions, strict=True)
                if param.partition_numel() * self._get_param_partition_rank(param) < param.ds_numel
            ]
            positions = [(self._agoq_offsets[p.ds_id], part.numel()) for p, part in kept]
            values = torch.cat([part.reshape(-1) for _, part in kept]) if kept else None
        if values is not None:
            self._agoq_store(values, positions)
        synchronized = get_accelerator().is_synchronized_device()
        for param in params_to_release:
            if not synchronized and param.grad is not None:
                param.grad.record_stream(get_accelerator().current_stream())
            param.grad = None
        return []

    # --- boundary and step ---------------------------------------------------------------------

    def backward_prologue(self) -> None:
        """Counts micro-steps for the statistics."""
        self.agoq_store.accounting.micro_steps += 1
        super().backward_prologue()

    def independent_gradient_partition_epilogue(self) -> None:
        """Reduce what the buckets still hold; at the boundary dequantize the partition; then DeepSpeed's
        epilogue (which finds the buckets empty and points ``averaged_gradients`` at the partition)."""
        if not self._agoq_active:
            return super().independent_gradient_partition_epilogue()
        reduce_bucket = getattr(self, _MANGLED + "reduce_and_partition_ipg_grads")
        for dtype in list(self.ipg_buckets.keys()):
            reduce_bucket(dtype)
        if self.is_gradient_accumulation_boundary():
            if not get_accelerator().resolves_data_dependency():
                # An ordering, not a host wait: DeepSpeed's epilogue below synchronizes once, as stock does.
                get_accelerator().current_stream().wait_stream(self.reduce_and_partition_stream)
            self._agoq_materialize()
        super().independent_gradient_partition_epilogue()

    def finalize_gradient_accumulation_boundary(self) -> None:
        """Unmanaged accumulation: dequantize the partition for ``step()``."""
        super().finalize_gradient_accumulation_boundary()
        if self._agoq_active:
            self._agoq_materialize()

    def agoq_before_step(self) -> None:
        """Materialize the partition if no boundary epilogue did (DeepSpeed steps on what it has)."""
        if self._agoq_partition.has_value and not self._agoq_live:
            self._agoq_materialize()
        self.agoq_store.note_buffers()

    def agoq_after_step(self, overflow: bool) -> None:
        """The accumulator restarts; the fp32 partition the step read is let go."""
        super().agoq_after_step(overflow)
        if self._agoq_active:
            self._agoq_release()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """DeepSpeed's ``zero_grad`` (the next micro-batch starts a new sum): the accumulator too."""
        super().zero_grad(set_to_none=set_to_none)
        if self._agoq_active:
            self.agoq_store.reset()
            if self._agoq_live:
                self._agoq_release()

    # --- checkpointing -------------------------------------------------------------------------

    def _agoq_layout(self) -> dict[str, Any]:
        return {"stage": 3, "numel": getattr(self, "_agoq_numel", 0)}

    def state_dict(self) -> dict[str, Any]:
        """DeepSpeed's state dict plus ``STATE_KEY``: the step counter and the error-feedback residual of
        this rank's partition (int8 codes + fp32 scales). A stock DeepSpeed optimizer ignores the key."""
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
        """DeepSpeed's ``load_state_dict``; restores the agoq residual when optimizer states are loaded
        from files written for this layout, otherwise it starts from zero (a stock checkpoint, a
        universal checkpoint, another number of ranks)."""
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
