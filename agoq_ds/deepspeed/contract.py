"""Every DeepSpeed internal agoq relies on, in one table, and the check that the installed DeepSpeed
still provides them (``check()``; run by ``agoq-ds report`` and ``tests/integration/test_deepspeed_contract.py``).

agoq subclasses five DeepSpeed classes. For each, ``FENCES`` lists the DeepSpeed methods the subclass
overrides, with a hash of DeepSpeed's source of each (a DeepSpeed release that changes one of them
fails the check by name, so the override is reviewed before it runs against code it was not written
for), the DeepSpeed methods (and properties) the subclass calls on ``self`` or ``super()``, hashed
the same way (a fork copied from DeepSpeed relies on what its helpers do), and the DeepSpeed data
attributes it uses on ``self``. ``FOREIGN`` lists the DeepSpeed names agoq reads or sets on other
objects (a parameter's ``ds_id``, a tensor's ``_zero_padding``, a module's private function).
``REBINDS`` are the module globals agoq rebinds while ``deepspeed.initialize`` runs (so that
DeepSpeed constructs agoq's engine and optimizers); ``INTERNALS`` the other DeepSpeed internals agoq
imports. Written against the last of ``agoq_ds._compat.TESTED_DEEPSPEED``.

The rule ``uncovered()`` enforces over every module of ``agoq_ds/deepspeed``: each private name
(``_name``, name-mangled ``_Class__name`` included, dunders and agoq's own ``_agoq*`` and module-level
names left out) and each ``ds_*`` name used as an attribute, through any receiver, or as the string
constant of a ``getattr``/``setattr``/``hasattr``/``delattr``, is listed: through ``self`` or
``super()`` in a fence of that module, through anything else in ``FOREIGN`` for that module.

After reviewing a DeepSpeed upgrade, ``python -m agoq_ds.deepspeed.contract`` prints the hashes of
the installed DeepSpeed in the table's layout.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._compat import TESTED_DEEPSPEED

DEEPSPEED_VERSION = TESTED_DEEPSPEED[-1]
"""The DeepSpeed release the hashes were taken from: the last tested one (``_compat`` is the one source)."""

WING = Path(__file__).resolve().parent
"""``agoq_ds/deepspeed``: the modules that may use DeepSpeed internals."""


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
    """DeepSpeed data attributes the agoq class uses on ``self``."""
    helpers: dict[str, str] = field(default_factory=dict)
    """DeepSpeed methods and properties the agoq class calls on ``self``/``super()`` (beyond its
    overrides) -> ``source_hash`` of DeepSpeed's source of each."""


@dataclass(frozen=True)
class Foreign:
    """A DeepSpeed name agoq uses on an object other than its subclasses' ``self``."""

    name: str
    owner: str
    """Import path of the DeepSpeed module or class that defines or sets it."""
    used_in: tuple[str, ...]
    """The ``agoq_ds/deepspeed`` modules (file stems) that use it."""
    digest: str = ""
    """``source_hash`` of it, where it is a function."""


FENCES: tuple[Fence, ...] = (
    Fence(
        "agoq_ds.deepspeed.engine.AgoqEngineMixin",
        "deepspeed.runtime.engine.DeepSpeedEngine",
        {
            "__init__": "eca5147d0b7c",
            "_configure_bf16_optimizer": "d77f01f6e007",
            "_configure_zero_optimizer": "2865a9d03277",
            "_take_model_step": "b5e1145cf37b",
            "backward": "99280baf4480",
            "buffered_allreduce_fallback": "d17d7d3375c2",
            "compile": "3a5082f21e12",
            "destroy": "e41accb7379d",
            "forward": "ee94d5ac2fb5",
            "load_checkpoint": "b06341e8eb59",
            "save_checkpoint": "2728646fe061",
            "zero_grad": "a5378adee885",
        },
        (
            "device",
            "global_rank",
            "global_samples",
            "global_steps",
            "gradient_average",
            "has_moe_layers",  # MoE outside ZeRO-1/2: gradients take DeepSpeed's own path
            "module",
            "monitor",
            "mpu",
            "optimizer",
            "pipeline_parallelism",
            "sequence_parallel_size",
        ),
        helpers={
            "_load_zero_checkpoint": "178566fb831f",
            "communication_data_type": "cd577f3f2265",
            "gradient_accumulation_steps": "cdf691109d77",
            "is_compiled": "3ebc73ae6833",
            "is_deepcompile_enabled": "3685d6d5938d",
            "is_gradient_accumulation_boundary": "10b57720f62d",
            "steps_per_print": "870fa40df40d",
            "zero_optimization": "ccd18f249cc8",
            "zero_optimization_stage": "f323978e44c3",
            "zero_reduce_scatter": "503c6bcdac91",
        },
    ),
    Fence(
        "agoq_ds.deepspeed.engine.AgoqPipelineEngine",
        "deepspeed.runtime.pipe.engine.PipelineEngine",
        {
            "_exec_backward_pass": "10fc40f9d36c",
            "_exec_forward_pass": "6756f116f019",
            "_exec_reduce_tied_grads": "7278dacd3b01",
        },
        # using_bf16_optimizer set by the mixin, for pipelines; stage_id/num_stages read by it (with a default)
        ("module", "num_stages", "optimizer", "stage_id", "using_bf16_optimizer"),
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
            "averaged_gradients",
            "bit16_groups",
            "cpu_offload",  # offload: the partition crosses to the host in 8 bits
            "cpu_offload_pin_memory",
            "dp_process_group",
            "grad_partition_insertion_offset",
            "grad_position",  # offload: where each owned slice sits in the host gradient
            "gradient_accumulation_dtype",  # the dtype of param.grad_accum (use_grad_accum_attribute)
            "local_overflow",  # offload: the flag the offloaded step's overflow check reads
            "grad_start_offset",
            "gradient_average",
            "ipg_buckets",
            "norm_for_param_grads",  # offload: the per-parameter norms the offloaded step reads
            "overflow",
            "overlap_comm",
            "params_already_reduced",
            "param_to_partition_ids",  # read by layout.bucket_layout
            "params_in_partition",
            "partition_gradients",
            "partition_size",
            "real_dp_process_group",
            "reduce_bucket_size",  # bounds a bucket's size for agoq_param_paths
            "reduce_scatter",
            "reduction_stream",
            "sequence_parallel_size",
            "single_partition_of_fp32_groups",  # offload: the fp32 host gradient the step reads
            "use_grad_accum_attribute",  # ZeRO-1 + offload + fp32 accumulation: reductions read grad_accum
            "zero_stage_string",
        ),
        helpers={
            "_clear_param_grad_only": "7bb9c44ab8f5",
            "_clear_previous_reduced_grads": "ddff9af6623d",
            "_epilogue_ran_this_backward": "6ce3407ccb79",
            "_release_ipg_buffers": "4e543a9eca47",
            "clear_grad_attribute": "ecddb6950dc5",
            "get_param_id": "1cf2da14f45c",
            "is_gradient_accumulation_boundary": "e68bd6b56643",
            "reduce_ipg_grads": "2d681fbe1aa9",
            "set_gradient_accumulation_boundary": "80acd33cc6ec",
        },
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
            # private, rebound to the dequantized partition:
            "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition",
            "averaged_gradients",
            "device",
            "dp_process_group",
            "fp16_groups",
            "fp32_partitioned_groups_flat",  # offload: the fp32 host gradients the step reads
            "grad_partitions_flat_buffer",
            "grad_position",  # offload: where each parameter's slice sits in them
            "gradient_accumulation_dtype",
            "ipg_buckets",
            "norm_for_param_grads",  # offload: the per-parameter norms the step reads
            "offload_optimizer",
            "offload_optimizer_pin_memory",
            "overflow",
            "reduce_and_partition_stream",
            "reduce_bucket_size",  # bounds a bucket's size for agoq_param_paths
            "sequence_parallel_size",
        ),
        helpers={
            "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads": "ad6856c4cdf1",  # private: called by name
            "_get_param_partition_group": "b21c55cefdce",
            "_get_param_partition_rank": "66322c326514",
            "_gradient_averaging_world_size": "9156e29d98e2",
            "get_param_id": "45790ba1d04f",
            "is_gradient_accumulation_boundary": "e68bd6b56643",
        },
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
        helpers={
            "_split_flat_tensor": "0d551dea85d2",
        },
    ),
)
"""The five subclasses (48 overridden methods)."""

FOREIGN: tuple[Foreign, ...] = (
    Foreign(
        "_param_dict", "deepspeed.runtime.config.DeepSpeedConfig", ("engine",)
    ),  # the config the engine is built from
    Foreign("_get_sequence_data_parallel_group", "deepspeed.utils.groups", ("engine",), "3730ce54b2b4"),
    Foreign(
        "_INSTRUCTION_MAP", "deepspeed.runtime.pipe.engine.PipelineEngine", ("engine",)
    ),  # the pipeline's instruction table, extended with agoq's overrides
    Foreign("_zero_padding", "deepspeed.runtime.zero.stage_1_and_2", ("zero_optimizer",)),  # marks a padding view
    Foreign("_hp_grad", "deepspeed.runtime.bf16_optimizer", ("bf16_optimizer",)),  # a bf16 param's fp32 gradient view
    Foreign(
        "ds_id", "deepspeed.runtime.zero.partition_parameters", ("stage3_optimizer",)
    ),  # ZeRO-3 parameter attributes
    Foreign("ds_numel", "deepspeed.runtime.zero.partition_parameters", ("stage3_optimizer",)),
    Foreign("ds_tensor", "deepspeed.runtime.zero.partition_parameters", ("stage3_optimizer",)),
    Foreign(
        "partition_numel", "deepspeed.runtime.zero.partition_parameters", ("stage3_optimizer",)
    ),  # public, listed too
)
"""DeepSpeed names used on objects other than a subclass's ``self`` (parameters, tensors, the config,
a module's private function); every private one ``uncovered`` finds must be here."""

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


def _static(owner: Any, name: str) -> Any:
    """``name`` as ``owner`` (a class: its MRO; a module) defines it, unbound; ``None`` if it does not."""
    for k in owner.__mro__ if inspect.isclass(owner) else (owner,):
        if name in vars(k):
            return vars(k)[name]
    return None


def helper(owner: Any, name: str) -> Any:
    """The function behind DeepSpeed's method, property or function ``name`` of ``owner`` (``None``
    if ``name`` is not one: a data attribute, or gone)."""
    value = _static(owner, name)
    if isinstance(value, property):
        return value.fget
    if isinstance(value, (staticmethod, classmethod)):
        return value.__func__
    return value if inspect.isfunction(value) else None


def _uses(owner: Any, name: str) -> bool:
    """Whether DeepSpeed's ``owner`` (a class, with its DeepSpeed bases, or a module) defines ``name`` or
    sets/reads ``<x>.<name>`` (``self.__x`` in the source of ``_Class__x``'s class)."""
    if _static(owner, name) is not None:
        return True
    scopes = owner.__mro__ if inspect.isclass(owner) else (owner,)
    for k in scopes:
        if not (getattr(k, "__module__", None) or k.__name__).startswith("deepspeed"):
            continue
        spelt = name.removeprefix(f"_{k.__name__}") if name.startswith(f"_{k.__name__}__") else name
        receiver = r"\bself" if inspect.isclass(owner) else ""
        try:
            if re.search(rf"{receiver}\.{re.escape(spelt)}\b", inspect.getsource(k)):
                return True
        except (OSError, TypeError):
            continue
    return False


def _load_owner(path: str) -> Any:
    """A DeepSpeed module or class by import path."""
    try:
        return importlib.import_module(path)
    except ImportError:
        return load(path)


def _digest_problem(where: str, fn: Any, digest: str, user: str, role: str) -> str | None:
    if fn is None:
        return f"{where} is gone; {user} {role}"
    if source_hash(fn) != digest:
        return (
            f"{where} changed (source hash {digest} -> {source_hash(fn)}): review {user}, which {role}, "
            "then update agoq_ds/deepspeed/contract.py (python -m agoq_ds.deepspeed.contract prints the hashes)"
        )
    return None


def check() -> list[str]:
    """What the installed DeepSpeed no longer provides as the table says, and what the table misses of
    ``agoq_ds/deepspeed`` (``uncovered``), one sentence each (empty: all)."""
    problems: list[str] = []
    for fence in FENCES:
        try:
            base = load(fence.deepspeed_class)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{fence.deepspeed_class} is gone ({exc}); {fence.agoq_class} extends it")
            continue
        for method, digest in fence.overrides.items():
            fn = getattr(base, method, None)
            found = _digest_problem(
                f"{fence.deepspeed_class}.{method}",
                fn and unwrap(fn),
                digest,
                f"{fence.agoq_class}.{method}",
                "overrides it",
            )
            problems += [found] if found else []
        for name, digest in fence.helpers.items():
            found = _digest_problem(
                f"{fence.deepspeed_class}.{name}", helper(base, name), digest, fence.agoq_class, "calls it"
            )
            problems += [found] if found else []
        for name in fence.state:
            if helper(base, name) is not None:
                problems.append(f"{fence.deepspeed_class}.{name} is a method: list it in helpers, with its hash")
            elif not _uses(base, name):
                problems.append(f"{fence.deepspeed_class} no longer has self.{name}, which {fence.agoq_class} uses")
    for use in FOREIGN:
        users = ", ".join(f"agoq_ds/deepspeed/{m}.py" for m in use.used_in)
        try:
            owner = _load_owner(use.owner)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{use.owner} is gone ({exc}); {users} use its {use.name}")
            continue
        fn = helper(owner, use.name)
        if fn is not None or use.digest:
            found = _digest_problem(f"{use.owner}.{use.name}", fn, use.digest, users, "uses it")
            problems += [found] if found else []
        elif not _uses(owner, use.name):
            problems.append(f"{use.owner} no longer defines or sets .{use.name}, which {users} use")
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
    return problems + uncovered()


@dataclass(frozen=True)
class Use:
    """One use of a private DeepSpeed name in a module of ``agoq_ds/deepspeed``."""

    module: str
    line: int
    name: str
    receiver: str
    """``self``, ``super()`` or the source of the other receiver."""
    cls: str | None
    """The class the use sits in, if any."""


_ACCESSORS = ("getattr", "setattr", "hasattr", "delattr")


def _is_private(name: str) -> bool:
    """A private DeepSpeed name: ``_name`` / ``_Class__name`` or ``ds_*``; not a dunder, not agoq's ``_agoq*``."""
    if name.startswith("ds_"):
        return True
    dunder = name.startswith("__") and name.endswith("__")
    return name.startswith("_") and not dunder and not name.startswith(("_agoq", "__agoq"))


def uses(source: str, module: str) -> list[Use]:
    """Every private DeepSpeed name (``_is_private``) ``source`` (the module ``module`` of
    ``agoq_ds/deepspeed``) uses as an attribute, through any receiver, or as a ``getattr``-family name
    (a string constant, or a module-level string constant plus a literal). The module's own top-level
    names are agoq's, not DeepSpeed's."""
    tree = ast.parse(source)
    consts: dict[str, str] = {}
    own: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        for target in targets:
            if isinstance(target, ast.Name):
                own.add(target.id)
                value = getattr(node, "value", None)
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    consts[target.id] = value.value

    def text(expr: ast.expr) -> str | None:
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return expr.value
        if isinstance(expr, ast.Name):
            return consts.get(expr.id)
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            left, right = text(expr.left), text(expr.right)
            return None if left is None or right is None else left + right
        return None

    def receiver(expr: ast.expr) -> str:
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "super":
            return "super()"
        return ast.unparse(expr)

    found: list[Use] = []

    def visit(node: ast.AST, cls: str | None) -> None:
        name, target = None, None
        if isinstance(node, ast.Attribute):
            name, target = node.attr, node.value
        elif isinstance(node, ast.Call) and len(node.args) >= 2:
            func = node.func
            accessor = isinstance(func, ast.Name) and func.id in _ACCESSORS
            accessor |= isinstance(func, ast.Attribute) and func.attr in ("__setattr__", "__getattribute__")
            if accessor:
                name, target = text(node.args[1]), node.args[0]
        if name is not None and target is not None and _is_private(name) and name not in own:
            found.append(Use(module, getattr(node, "lineno", 0), name, receiver(target), cls))
        for child in ast.iter_child_nodes(node):
            visit(child, node.name if isinstance(node, ast.ClassDef) else cls)

    visit(tree, None)
    return found


def uncovered_in(source: str, module: str) -> list[str]:
    """The private DeepSpeed names ``source`` (module ``module`` of ``agoq_ds/deepspeed``) uses that
    the table does not list, one sentence each."""
    fenced: set[str] = set()
    for fence in FENCES:
        if fence.agoq_class.rsplit(".", 2)[-2] == module:
            fenced |= set(fence.overrides) | set(fence.helpers) | set(fence.state)
    foreign = {use.name for use in FOREIGN if module in use.used_in}
    problems = []
    for use in uses(source, module):
        through_self = use.receiver in ("self", "super()") and use.cls is not None
        if use.name not in (fenced if through_self else foreign):
            table = f"the fence of {use.cls}" if through_self else f"FOREIGN (used_in {module!r})"
            problems.append(
                f"agoq_ds/deepspeed/{module}.py:{use.line} uses {use.receiver}.{use.name}, a DeepSpeed internal "
                f"not in {table} of agoq_ds/deepspeed/contract.py"
            )
    return problems


def uncovered() -> list[str]:
    """``uncovered_in`` over every module of ``agoq_ds/deepspeed``."""
    return [p for path in sorted(WING.glob("*.py")) for p in uncovered_in(path.read_text(), path.stem)]


def hashes() -> str:
    """The table's hashes recomputed on the installed DeepSpeed, in its layout (for a maintainer to
    paste after reviewing what changed)."""
    lines = []
    for fence in FENCES:
        base = load(fence.deepspeed_class)
        lines.append(f"# {fence.agoq_class} <- {fence.deepspeed_class}")
        for title, table in (("overrides", fence.overrides), ("helpers", fence.helpers)):
            lines.append(f"{title} = {{")
            for name in sorted(table):
                fn = helper(base, name) if title == "helpers" else getattr(base, name, None)
                fn = fn and unwrap(fn)
                lines.append(f'    "{name}": "{source_hash(fn) if fn is not None else "GONE"}",')
            lines.append("}")
    lines.append("# FOREIGN functions")
    for use in FOREIGN:
        fn = helper(_load_owner(use.owner), use.name)
        if fn is not None:
            lines.append(f'Foreign("{use.name}", "{use.owner}", {use.used_in!r}, "{source_hash(fn)}")')
    return "\n".join(lines)


if __name__ == "__main__":
    print(hashes())
