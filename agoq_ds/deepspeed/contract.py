"""Every DeepSpeed internal agoq relies on, in one table, and the check that the installed DeepSpeed
still provides them (``check()``; run by ``agoq-ds report`` and ``tests/integration/test_deepspeed_contract.py``).

agoq subclasses five DeepSpeed classes. For each, ``FENCES`` lists the DeepSpeed methods the subclass
overrides, with a hash of DeepSpeed's source of each (a DeepSpeed release that changes one of them
fails the check by name, so the override is reviewed before it runs against code it was not written
for), and the DeepSpeed attributes and helper methods the subclass uses on ``self``. ``REBINDS`` are
the module globals agoq rebinds while ``deepspeed.initialize`` runs (so that DeepSpeed constructs
agoq's engine and optimizers); ``INTERNALS`` the other DeepSpeed internals agoq imports. Written
against ``DEEPSPEED_VERSION``.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import textwrap
from dataclasses import dataclass
from typing import Any

DEEPSPEED_VERSION = "0.19.8"
"""The DeepSpeed release the table was written against."""


@dataclass(frozen=True)
class Fence:
    """One agoq subclass of a DeepSpeed class and what it relies on."""

    agoq_class: str
    """Import path of the agoq class."""
    deepspeed_class: str
    """Import path of the DeepSpeed class it extends."""
    overrides: dict[str, str]
    """DeepSpeed method -> ``source_hash`` of DeepSpeed's source of it."""
    state: tuple[str, ...]
    """DeepSpeed attributes and methods the agoq class uses on ``self`` (beyond its overrides)."""


FENCES: tuple[Fence, ...] = (
    Fence(
        "agoq_ds.deepspeed.engine.AgoqEngineMixin",
        "deepspeed.runtime.engine.DeepSpeedEngine",
        {
            "__init__": "eca5147d0b7c",
            "_configure_bf16_optimizer": "d77f01f6e007",
            "_configure_zero_optimizer": "2865a9d03277",
            "_take_model_step": "b5e1145cf37b",
            "buffered_allreduce_fallback": "d17d7d3375c2",
            "destroy": "e41accb7379d",
            "load_checkpoint": "b06341e8eb59",
            "save_checkpoint": "2728646fe061",
            "zero_grad": "a5378adee885",
        },
        (
            "_load_zero_checkpoint",
            "communication_data_type",
            "device",
            "global_rank",
            "global_samples",
            "global_steps",
            "gradient_accumulation_steps",
            "gradient_average",
            "is_gradient_accumulation_boundary",
            "module",
            "monitor",
            "mpu",
            "optimizer",
            "pipeline_parallelism",
            "sequence_parallel_size",
            "steps_per_print",
            "zero_optimization",
        ),
    ),
    Fence(
        "agoq_ds.deepspeed.engine.AgoqPipelineEngine",
        "deepspeed.runtime.pipe.engine.PipelineEngine",
        {"_exec_reduce_tied_grads": "7278dacd3b01"},
        ("module", "optimizer", "using_bf16_optimizer"),  # the last one set by the mixin, for pipelines
    ),
    Fence(
        "agoq_ds.deepspeed.zero_optimizer.AgoqZeroOptimizer",
        "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer",
        {
            "__init__": "a381470af4e9",
            "_use_compact_grad_partition_buffer": "645cfe124d95",
            "average_tensor": "2845c2dde638",
            "backward_prologue": "f4d5763c54a9",
            "buffered_reduce_fallback": "1f4b86d6ac81",
            "copy_grads_in_partition": "b733740191ae",
            "destroy": "fc488285726e",
            "finalize_gradient_accumulation_boundary": "5672a3d8c505",
            "get_gradient_for_reduction": "4930513a5328",
            "independent_gradient_partition_epilogue": "a6e67d422144",
            "load_state_dict": "043f71c74036",
            "state_dict": "9d17961a96cd",
            "step": "279ae7c6a4e8",
            "zero_grad": "ff3a3baad403",
        },
        (
            "_clear_param_grad_only",
            "_clear_previous_reduced_grads",
            "_epilogue_ran_this_backward",
            "_release_ipg_buffers",
            "averaged_gradients",
            "bit16_groups",
            "clear_grad_attribute",
            "dp_process_group",
            "get_param_id",
            "grad_partition_insertion_offset",
            "grad_start_offset",
            "gradient_average",
            "ipg_buckets",
            "is_gradient_accumulation_boundary",
            "overflow",
            "overlap_comm",
            "params_already_reduced",
            "param_to_partition_ids",  # read by layout.bucket_layout
            "params_in_partition",
            "partition_gradients",
            "partition_size",
            "real_dp_process_group",
            "reduce_bucket_size",  # bounds a bucket's size for agoq_param_paths
            "reduce_ipg_grads",
            "reduce_scatter",
            "reduction_stream",
            "sequence_parallel_size",
            "set_gradient_accumulation_boundary",
            "zero_stage_string",
        ),
    ),
    Fence(
        "agoq_ds.deepspeed.stage3_optimizer.AgoqStage3Optimizer",
        "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3",
        {
            "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_contiguous_grads": "98ac2e89a47b",
            "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads": "5f37b9f8659e",
            "__init__": "cd4b2ccda90d",
            "backward_prologue": "1b9ad8d1a8a7",
            "finalize_gradient_accumulation_boundary": "46cb396087b9",
            "independent_gradient_partition_epilogue": "e8bc243cb6b9",
            "load_state_dict": "528212ae5f98",
            "partition_grads": "3ca6b17c5709",
            "state_dict": "1bbb464edd90",
            "step": "1dfecf4f2fb7",
            "zero_grad": "178d952378e9",
        },
        (
            "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads",  # private: called by name
            "__param_id_to_grad_partition",  # private: rebound to the dequantized partition
            "_get_param_partition_group",
            "_get_param_partition_rank",
            "_gradient_averaging_world_size",
            "averaged_gradients",
            "device",
            "dp_process_group",
            "fp16_groups",
            "grad_partitions_flat_buffer",
            "gradient_accumulation_dtype",
            "ipg_buckets",
            "is_gradient_accumulation_boundary",
            "overflow",
            "reduce_and_partition_stream",
            "reduce_bucket_size",  # bounds a bucket's size for agoq_param_paths
            "sequence_parallel_size",
        ),
    ),
    Fence(
        "agoq_ds.deepspeed.bf16_optimizer.AgoqBF16Optimizer",
        "deepspeed.runtime.bf16_optimizer.BF16_Optimizer",
        {
            "__init__": "ef41a0d8d1f3",
            "_update_hp_grad": "feea4e5c7758",
            "clear_hp_grads": "cf4ccee65479",
            "configure_autoep_folding_tp_gradient_reduction": "7d94208fc6da",
            "load_state_dict": "3358ca93e1a7",
            "state_dict": "874f3362139d",
            "step": "2106bc88c518",
            "update_hp_grads": "44949879ec65",
        },
        (
            "_split_flat_tensor",
            "bf16_groups",
            "dp_process_group",
            "fp32_groups_actual_gradients_flat",
            "fp32_groups_gradient_flat_partition",
            "fp32_groups_gradients",
            "fp32_groups_gradients_flat",
            "fp32_groups_has_gradients",
            "grad_acc_dtype",
            "immediate_grad_update",
            "non_expert_gradients",
            "overflow",
            "real_dp_process_group",
            "using_real_optimizer",
        ),
    ),
)
"""The five subclasses (43 overridden methods)."""

REBINDS: tuple[tuple[str, str], ...] = (
    ("deepspeed", "DeepSpeedEngine"),
    ("deepspeed", "PipelineEngine"),
    ("deepspeed.runtime.engine", "DeepSpeedZeroOptimizer"),
    ("deepspeed.runtime.engine", "BF16_Optimizer"),
    ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3"),
)
"""Module globals agoq rebinds for one ``deepspeed.initialize`` call: the engines (``integration.py``)
and the optimizers (``install.py``)."""


INTERNALS: tuple[str, ...] = (
    "deepspeed.runtime.config_utils.DeepSpeedConfigModel",
    "deepspeed.runtime.pipe.module.PipelineModule",
    "deepspeed.runtime.activation_checkpointing.checkpointing.checkpoint",
    "deepspeed.runtime.tensor_parallel.init_utils.load_ds_config",
    "deepspeed.runtime.zero.stage_1_and_2.GradPartitionBufferGroup",
    "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3",
)
"""Other DeepSpeed internals agoq imports (``internals.py``, and the partition-buffer type of ZeRO-1/2)."""


def load(path: str) -> Any:
    """The object at import path ``package.module.Name``."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def unwrap(fn: Any) -> Any:
    """The function a decorator wraps: ``__wrapped__``, or the one function captured by a closure
    (DeepSpeed's ``instrument_w_nvtx`` sets no ``__wrapped__``: hashing its wrapper would hash the same
    few lines for every decorated method, and a change to the method would go unnoticed)."""
    fn = inspect.unwrap(fn)
    cells = [c.cell_contents for c in getattr(fn, "__closure__", None) or () if inspect.isfunction(c.cell_contents)]
    return unwrap(cells[0]) if len(cells) == 1 else fn


def source_hash(fn: Any) -> str:
    """First 12 hex digits of the SHA-256 of ``fn``'s (dedented) source, decorators unwrapped."""
    return hashlib.sha256(textwrap.dedent(inspect.getsource(unwrap(fn))).encode()).hexdigest()[:12]


def _uses(cls: type, name: str) -> bool:
    """Whether DeepSpeed's ``cls`` (or a DeepSpeed base of it) defines ``name`` or sets/reads ``self.<name>``."""
    if any(name in vars(k) for k in cls.__mro__):
        return True
    pattern = re.compile(rf"\bself\.{re.escape(name)}\b")
    for k in cls.__mro__:
        if not k.__module__.startswith("deepspeed"):
            continue
        try:
            if pattern.search(inspect.getsource(k)):
                return True
        except (OSError, TypeError):
            continue
    return False


def check() -> list[str]:
    """What the installed DeepSpeed no longer provides as the table says, one sentence each (empty: all)."""
    problems: list[str] = []
    for fence in FENCES:
        try:
            base = load(fence.deepspeed_class)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{fence.deepspeed_class} is gone ({exc}); {fence.agoq_class} extends it")
            continue
        for method, digest in fence.overrides.items():
            fn = getattr(base, method, None)
            if fn is None:
                problems.append(f"{fence.deepspeed_class}.{method} is gone; {fence.agoq_class} overrides it")
            elif source_hash(fn) != digest:
                problems.append(
                    f"{fence.deepspeed_class}.{method} changed (source hash {digest} -> {source_hash(fn)}): review "
                    f"{fence.agoq_class}.{method}, which overrides it, then update agoq_ds/deepspeed/contract.py"
                )
        for name in fence.state:
            if not _uses(base, name):
                problems.append(f"{fence.deepspeed_class} no longer has self.{name}, which {fence.agoq_class} uses")
    for path in INTERNALS:
        try:
            load(path)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{path} is gone ({exc}); agoq_ds/deepspeed imports it")
    for module, name in REBINDS:
        try:
            if not inspect.isclass(getattr(importlib.import_module(module), name, None)):
                problems.append(f"{module}.{name} is no longer a class agoq can rebind")
        except ImportError as exc:
            problems.append(f"{module} is gone ({exc}); agoq rebinds {module}.{name}")
    return problems
