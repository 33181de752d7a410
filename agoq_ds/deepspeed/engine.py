"""The AGoQ engines: ``DeepSpeedEngine`` and ``PipelineEngine`` subclasses sharing one mixin.

At construction the mixin validates the ``"agoq"`` block and rejects unsupported combinations
before DeepSpeed builds anything, swaps the 8-bit ZeRO-1/2 or ZeRO-3 optimizer (or the 8-bit
``BF16_Optimizer``) in while DeepSpeed constructs its optimizer, hangs the stage-0 ``param.grad``
accumulator on the engine when there is neither, installs the activation quantizer once the model
(and pipeline stage) is known, and prints one start-up summary on rank 0. Every ``steps_per_print``
optimizer steps it publishes the agoq statistics to DeepSpeed's monitor (TensorBoard/CSV/W&B).
Checkpoints carry the agoq state.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import deepspeed
import torch
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe import schedule as pipe_schedule
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.utils import groups, log_dist, logger
from deepspeed.utils.logging import print_dist

from .. import quant
from .._compat import check_deepspeed_version
from ..activation.compiled import compiled_modules, uncompiled
from ..config import AgoqConfig, AgoqConfigError, parse_agoq_config
from ..constants import CHECKPOINT_KEY, CONFIG_KEY, MONITOR_PREFIX
from ..gradient.host import GradientHost, gradient_host
from ..overflow_watch import OverflowStreak, overflow_message
from ..summary import startup_summary

check_deepspeed_version(deepspeed.__version__)


def _ds_config_dict(kwargs: dict[str, Any]) -> dict[str, Any]:
    config_class = kwargs.get("config_class")
    if config_class is not None:
        return config_class._param_dict
    from .config_source import find_ds_config

    return find_ds_config(kwargs.get("args"), kwargs.get("config"), kwargs.get("config_params")) or {}


class AgoqEngineMixin:
    """What the AGoQ engines add to DeepSpeed's engines (see the module docstring)."""

    agoq_config: AgoqConfig
    """The validated ``"agoq"`` block."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        ds_config = _ds_config_dict(kwargs)
        agoq_config = parse_agoq_config(ds_config.get(CONFIG_KEY))
        self._agoq_check_before_build(ds_config, agoq_config)
        # nn.Module.__init__ has not run yet: plain attributes only.
        object.__setattr__(self, "agoq_config", agoq_config)
        object.__setattr__(self, "agoq_activation", None)
        object.__setattr__(self, "_agoq_summary_logged", False)
        object.__setattr__(self, "_agoq_overflows", OverflowStreak())
        object.__setattr__(self, "agoq_param_gradients", None)
        object.__setattr__(self, "_agoq_check", None)
        object.__setattr__(self, "_agoq_compile_checked", False)
        super().__init__(*args, **kwargs)
        if hasattr(self, "using_bf16_optimizer"):
            # PipelineEngine tests type(optimizer) == BF16_Optimizer; the agoq subclass takes that route too.
            self.using_bf16_optimizer = isinstance(self.optimizer, BF16_Optimizer)
        self._agoq_install_param_gradients()
        self._agoq_install_activation()
        self._agoq_install_check()
        if self.agoq_config.log_summary:
            print_dist(startup_summary(self), ranks=[0])

    @staticmethod
    def _agoq_check_before_build(ds_config: dict[str, Any], agoq_config: AgoqConfig) -> None:
        from .unsupported import UnsupportedConfigError, check_supported

        try:
            # The engine's own kernel choice (``agoq_kernels``, which the gradient store and the
            # activation path use); the process default is left alone, so engines with different
            # ``kernel_backend`` in one process do not affect each other.
            quant.kernels_for(agoq_config.kernel_backend)
        except quant.BackendUnavailable as exc:
            available = [s.name for s in quant.all_status() if s.available]
            raise AgoqConfigError(
                f"agoq.kernel_backend={agoq_config.kernel_backend!r}: {exc}; available here: auto, "
                + ", ".join(available)
            ) from None
        if agoq_config.gradient_on:
            try:
                check_supported(ds_config, agoq_config)
            except UnsupportedConfigError as exc:
                if not exc.stock_gradients_suffice or "enabled" in agoq_config.gradient.model_fields_set:
                    raise
                # ``"agoq": {}`` asks for what agoq can do here: quantized activations, gradients on
                # DeepSpeed's own path (an explicit ``gradient.enabled: true`` is refused above).
                agoq_config.gradient.enabled = False
                logger.warning(
                    f"agoq: 8-bit gradients are not available with {exc.setting}; gradients take DeepSpeed's own "
                    "path, activations are quantized as configured (set agoq.gradient.enabled=false to "
                    "silence this)"
                )

    @property
    def agoq_kernels(self) -> quant.Kernels:
        """Which quantization kernels this engine runs (``agoq.kernel_backend``): pass it down as
        ``kernels=`` (``quant.quantize``/``dequantize``, the fused ops, ``GradientStore``)."""
        return quant.kernels_for(self.agoq_config.kernel_backend)

    # --- construction hooks -------------------------------------------------------------------

    def _agoq_stock_gradient_fallback(self, stage: int | None, optimizer: Any = None) -> None:
        """What only the built engine shows (MoE layers, a Muon optimizer passed as an object) where the
        8-bit path cannot reduce (``unsupported.check_moe``, ``check_optimizer_type``; ``stage`` None:
        ``BF16_Optimizer``): refused when 8-bit gradients were asked for explicitly, else gradients take
        DeepSpeed's own path (said once), as for the other settings the default block cannot honour."""
        if not self.agoq_config.gradient_on:
            return
        from .unsupported import UnsupportedConfigError, check_moe, check_optimizer_type

        try:
            if self.has_moe_layers:
                check_moe(stage, bool(self.zero_reduce_scatter()))
            if optimizer is not None:
                check_optimizer_type(stage, type(optimizer).__name__)
        except UnsupportedConfigError as exc:
            if "enabled" in self.agoq_config.gradient.model_fields_set:
                raise
            self.agoq_config.gradient.enabled = False
            logger.warning(
                f"agoq: 8-bit gradients are not available with {exc.setting} here; gradients take "
                "DeepSpeed's own path, activations are quantized as configured"
            )

    def _configure_zero_optimizer(self, optimizer):
        from .install import agoq_zero_optimizer

        self._agoq_stock_gradient_fallback(self.zero_optimization_stage(), optimizer)
        if not self.agoq_config.gradient_on:
            return super()._configure_zero_optimizer(optimizer)
        with agoq_zero_optimizer(self.agoq_config):
            return super()._configure_zero_optimizer(optimizer)

    def _configure_bf16_optimizer(self, optimizer):
        from .install import agoq_bf16_optimizer

        self._agoq_stock_gradient_fallback(None, optimizer)
        if not self.agoq_config.gradient_on:
            return super()._configure_bf16_optimizer(optimizer)
        with agoq_bf16_optimizer(self.agoq_config):
            return super()._configure_bf16_optimizer(optimizer)

    def _agoq_install_param_gradients(self) -> None:
        """ZeRO stage 0 without ``BF16_Optimizer``: int8 ``param.grad`` accumulation + 8-bit all-reduce."""
        cfg = self.agoq_config
        if not cfg.gradient_quantized:
            return
        if self.zero_optimization() or self.optimizer is None or isinstance(self.optimizer, BF16_Optimizer):
            return
        self._agoq_stock_gradient_fallback(0)
        if not cfg.gradient_quantized:
            return
        from ..gradient.param_grads import ParamGradients

        group, _ = self._agoq_dp_group()
        gradients = ParamGradients(
            list(self.module.parameters()),
            cfg,
            is_boundary=self.is_gradient_accumulation_boundary,
            rank=self.global_rank,
            world_size=dist.get_world_size(group=group),
            device=self.device,
        )
        object.__setattr__(self, "agoq_param_gradients", gradients)

    def _agoq_install_check(self) -> None:
        """``agoq.gradient.check_steps``: the debug guard (``gradient/check.py``); nothing when 0."""
        steps = self.agoq_config.gradient.check_steps
        if steps and self.agoq_gradient_path() is not None:
            from ..gradient.check import GradientCheck

            object.__setattr__(self, "_agoq_check", GradientCheck(list(self.module.named_parameters()), steps))

    def _agoq_install_activation(self) -> None:
        cfg = self.agoq_config
        if not cfg.activation_on:
            return
        from ..activation.quantizer import ActivationQuantizer
        from .internals import PIPELINE

        quantizer = ActivationQuantizer(
            self.module,
            cfg.activation,
            stage_id=getattr(self, "stage_id", 0),
            num_stages=getattr(self, "num_stages", 1),
            micro_batches=self.gradient_accumulation_steps(),
            seed=cfg.seed,
            pipeline=PIPELINE,
            kernels=self.agoq_kernels,
        )
        quantizer.install()
        if _hf_checkpointing_on(self.module) and cfg.activation.checkpointing:
            quantizer.enable_hf_gradient_checkpointing(self.module)
        object.__setattr__(self, "agoq_activation", quantizer)

    # --- training-time hooks ------------------------------------------------------------------

    def _agoq_dp_group(self) -> tuple[Any, float]:
        """The group and averaging divisor DeepSpeed's stage-0 all-reduce uses
        (``_reduce_non_expert_gradients``)."""
        if self.pipeline_parallelism:
            group = self.mpu.get_data_parallel_group()
            return group, float(dist.get_world_size(group))
        group = groups._get_sequence_data_parallel_group()
        return group, dist.get_world_size(group) / float(self.sequence_parallel_size)

    def buffered_allreduce_fallback(self, grads=None, elements_per_buffer=500000000):
        """DeepSpeed's stage-0 / ``BF16_Optimizer`` gradient all-reduce; through the 8-bit path when the
        engine reduces its own gradients (``grads=None``) and agoq holds them."""
        host = self.agoq_gradient_path()
        if grads is not None or host is None or not host.agoq_engine_reduces:
            return super().buffered_allreduce_fallback(grads=grads, elements_per_buffer=elements_per_buffer)
        group, divisor = self._agoq_dp_group()
        host.agoq_reduce(
            group=group,
            scale=1.0 / divisor if self.gradient_average else 1.0,
            comm_dtype=self.communication_data_type,
            elements_per_buffer=elements_per_buffer,
        )

    def destroy(self):
        """The gradient host's ``agoq_close`` (hooks), then DeepSpeed's ``destroy``."""
        host = self.agoq_gradient_path()
        if host is not None:
            host.agoq_close()
        if self._agoq_check is not None:
            self._agoq_check.remove()
        super().destroy()

    def zero_grad(self):
        """DeepSpeed's ``zero_grad``, then the gradient host's (e.g. stage 0's int8 accumulators)."""
        super().zero_grad()
        host = self.agoq_gradient_path()
        if host is not None:
            host.agoq_zero_grad()

    # --- torch.compile ----------------------------------------------------------------------------

    def compile(self, backend=None, compile_kwargs=None, schedule=None, compiled_autograd_enabled=False) -> None:
        """DeepSpeed's ``compile``; with activation quantization on, the backend is wrapped so the
        compiled graphs store agoq's quantized activations (``activation/compiled.py``), and the
        first step's forwards run uncompiled to learn the classification (``forward``)."""
        if backend is None:
            backend = get_accelerator().get_compile_backend()
        quantizer = self.agoq_activation
        if quantizer is not None and quantizer.engine.recorder.enabled and not self.is_compiled:
            if self.is_deepcompile_enabled():
                raise AgoqConfigError(
                    "agoq.activation with DeepCompile (compile.deepcompile: true) is not supported: "
                    "DeepCompile replaces the autograd graph agoq's saved-tensor hooks are inlined into; "
                    "set compile.deepcompile to false or agoq.activation.enabled to false"
                )
            if compiled_autograd_enabled:
                raise AgoqConfigError(
                    "agoq.activation with compiled_autograd_enabled=True is not supported: PyTorch does not "
                    "inline saved-tensor hooks under compiled autograd; compile without it or set "
                    "agoq.activation.enabled to false"
                )
            backend = quantizer.compiled().wrap_backend(backend)
        super().compile(
            backend=backend,
            compile_kwargs={} if compile_kwargs is None else compile_kwargs,
            schedule=schedule,
            compiled_autograd_enabled=compiled_autograd_enabled,
        )

    def forward(self, *inputs, **kwargs):
        """DeepSpeed's ``forward``, in ``_agoq_compiled_scope`` once ``compile`` ran."""
        with self._agoq_compiled_scope():
            return super().forward(*inputs, **kwargs)

    @contextmanager
    def _agoq_compiled_scope(self) -> Iterator[None]:
        """Where the model is called once ``compile`` ran with activation quantization on: uncompiled
        while the quantizer learns the model (first step, calibration), then compiled under agoq's
        inlineable saved-tensor hooks, pushed here outside the compiled region. Nothing otherwise."""
        quantizer = self.agoq_activation
        if quantizer is not None and not self.is_compiled and not self._agoq_compile_checked:
            self._agoq_refuse_regional_compile()
        if quantizer is None or not self.is_compiled or not quantizer.engine.recorder.enabled:
            yield
        elif quantizer.eager_needed:
            quantizer.engine.install()
            with uncompiled(self.module):
                yield
        else:
            quantizer.engine.remove()  # Dynamo cannot trace the eager packer's module hooks
            with quantizer.compiled().forward():
                yield

    def _agoq_refuse_regional_compile(self) -> None:
        """First forward: modules compiled one by one (accelerate's regional compilation) bypass
        ``engine.compile()``, and Dynamo cannot trace agoq's eager hooks inside them: say so."""
        object.__setattr__(self, "_agoq_compile_checked", True)
        if not self.agoq_activation.engine.recorder.enabled:
            return
        names = compiled_modules(self.module)
        if names:
            shown = ", ".join(n or "<model>" for n in names[:3]) + (" ..." if len(names) > 3 else "")
            raise AgoqConfigError(
                f"agoq.activation: modules were compiled one by one ({shown}) instead of through "
                "engine.compile(); agoq's activation hooks run in compiled graphs only through engine.compile() "
                "(accelerate: use_regional_compilation=False). Compile with engine.compile() or set "
                "agoq.activation.enabled to false"
            )

    def _agoq_backward_done(self) -> None:
        """A backward finished: the compiled graphs' stored tensors count as freed."""
        quantizer = self.agoq_activation
        if quantizer is not None and quantizer.compiled_in_use:
            quantizer.compiled().backward_done()

    def backward(self, *args, **kwargs):
        """DeepSpeed's ``backward``; then the compiled graphs' stored tensors count as freed."""
        out = super().backward(*args, **kwargs)
        self._agoq_backward_done()
        return out

    def _take_model_step(self, lr_kwargs):
        host = self.agoq_gradient_path()
        steps = host if host is not None and host.agoq_engine_steps else None  # no optimizer subclass runs it
        if steps is not None:
            steps.agoq_before_step()
        check = self._agoq_check
        if check is not None and check.active:
            group, _ = self._agoq_dp_group()
            check.check(self.global_steps + 1, group=group, world_size=dist.get_world_size(group=group))
        super()._take_model_step(lr_kwargs)
        overflow = bool(getattr(self.optimizer, "overflow", False))  # a host bool DeepSpeed already has
        if steps is not None:
            steps.agoq_after_step(overflow)
        if self.agoq_activation is not None:
            if self._agoq_overflows.update(overflow):
                table = self.agoq_activation.table()
                bits = ", ".join(f"{c} {b}" for c, b in sorted(table.items()))
                logger.warning(overflow_message(self._agoq_overflows.streak, f"bits per class: {bits}"))
            self.agoq_activation.on_step_end()
            if not self._agoq_summary_logged and self.agoq_config.log_summary:
                object.__setattr__(self, "_agoq_summary_logged", True)
                print_dist("agoq activation storage measured in step 1:\n" + self.agoq_activation.report(), ranks=[0])
        every = self.steps_per_print()
        if every and self.global_steps % every == 0:
            self._agoq_publish()

    def _agoq_publish(self) -> None:
        stats = self.agoq_stats()
        if self.global_rank != 0 or not stats:
            return
        if self.monitor.enabled:
            self.monitor.write_events([(MONITOR_PREFIX + k, v, self.global_samples) for k, v in stats.items()])
        shown = {k: stats[k] for k in _HEADLINE if k in stats}
        log_dist(
            f"agoq step {self.global_steps}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items()),
            ranks=[0],
        )

    # --- public API ---------------------------------------------------------------------------

    def agoq_stats(self) -> dict[str, float]:
        """Live agoq statistics, flat ``{"activation/...": x, "gradient/...": y}``.

        Activation: stored bytes (peak per step), what bf16/unquantized storage would hold, average
        stored bits, compression. Gradient: communicated bytes per step and the fp32/bf16 baseline,
        gradient-buffer bytes versus fp32, quantization error estimates.
        """
        stats: dict[str, float] = {}
        if self.agoq_activation is not None:
            stats.update({f"activation/{k}": float(v) for k, v in self.agoq_activation.stats().items()})
        path = self.agoq_gradient_path()
        if path is not None:
            stats.update({f"gradient/{k}": float(v) for k, v in path.agoq_stats().items()})
        return stats

    def agoq_gradient_path(self) -> GradientHost | None:
        """What holds the 8-bit gradients (a ``GradientHost``): the ZeRO-1/2, ZeRO-3 or
        ``BF16_Optimizer`` subclass, or the stage-0 ``ParamGradients`` (``engine.agoq_param_gradients``);
        None when the gradient path is off."""
        if self.agoq_param_gradients is not None:
            return self.agoq_param_gradients
        return gradient_host(self.optimizer)

    def agoq_param_paths(self) -> dict[str, str]:
        """``name -> "exact" | "8bit"`` for every trainable parameter of this rank's module whose
        gradient agoq holds (``agoq_ds/gradient/paths.py``); empty when the gradient path is off."""
        host = self.agoq_gradient_path()
        if host is None:
            return {}
        paths = host.agoq_param_paths()
        return {name: paths[id(p)] for name, p in self.module.named_parameters() if id(p) in paths}

    def agoq_report(self, per_layer: bool = False) -> str:
        """Human-readable activation table (bits, bytes, ratio per class) plus gradient figures."""
        parts = []
        if self.agoq_activation is not None:
            parts.append(self.agoq_activation.report(per_layer=per_layer))
        grad = {k: v for k, v in self.agoq_stats().items() if k.startswith("gradient/")}
        if grad:
            parts.append("\n".join(f"{k:40s} {_fmt(v)}" for k, v in grad.items()))
        return "\n\n".join(parts)

    def agoq_state_dict(self) -> dict[str, Any]:
        """Model-level agoq state (activation policy table, calibration); optimizer state travels
        with the optimizer's own ``state_dict``."""
        state: dict[str, Any] = {"version": 1}
        if self.agoq_activation is not None:
            state["activation"] = self.agoq_activation.state_dict()
        return state

    def agoq_load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``agoq_state_dict`` returned."""
        if self.agoq_activation is not None and "activation" in state:
            self.agoq_activation.load_state_dict(state["activation"])

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True, **kwargs):
        """DeepSpeed's ``save_checkpoint`` with the agoq state added to ``client_state``; the stage-0
        gradient state (per rank: step counter, error-feedback residuals) goes to its own file in the
        tag folder, since DeepSpeed saves stage-0 optimizer state from data-parallel rank 0 only."""
        client_state = dict(client_state or {})
        client_state[CHECKPOINT_KEY] = self.agoq_state_dict()
        tag = str(tag) if tag is not None else f"global_step{self.global_steps}"
        result = super().save_checkpoint(
            save_dir, tag=tag, client_state=client_state, save_latest=save_latest, **kwargs
        )
        host = self.agoq_gradient_path()
        if host is not None and host.agoq_rank_file:
            torch.save(host.agoq_rank_state(), self._agoq_gradient_file(save_dir, tag))
        return result

    def load_checkpoint(self, load_dir, *args, **kwargs):
        """DeepSpeed's ``load_checkpoint``; restores the agoq state when the checkpoint has one (a
        stock checkpoint keeps the freshly configured state)."""
        call = inspect.signature(DeepSpeedEngine.load_checkpoint).bind(self, load_dir, *args, **kwargs)
        call.apply_defaults()
        arguments = {k: v for k, v in call.arguments.items() if k not in ("self", "load_dir")}
        optimizer_states = arguments["load_optimizer_states"] and not arguments["load_module_only"]
        per_rank_bf16 = isinstance(self.optimizer, BF16_Optimizer) and not self.zero_optimization()
        if per_rank_bf16 and optimizer_states:
            # DeepSpeed 0.19.8 loads BF16_Optimizer state at stage 0 from the model file (data-parallel
            # rank 0's, as a dict: KeyError 0); the per-rank files it writes beside it are the right ones.
            arguments["load_optimizer_states"] = False
        load_path, client_state = super().load_checkpoint(load_dir, **arguments)
        if load_path is not None:
            tag = os.path.basename(os.path.dirname(load_path))
            if per_rank_bf16 and optimizer_states:
                self._load_zero_checkpoint(load_dir, tag, load_optimizer_states=True)
            host = self.agoq_gradient_path()
            if host is not None and optimizer_states and host.agoq_rank_file:
                self._agoq_load_gradient_file(host, load_dir, tag)
        if isinstance(client_state, dict) and CHECKPOINT_KEY in client_state:
            self.agoq_load_state_dict(client_state.pop(CHECKPOINT_KEY))
        return load_path, client_state

    def _agoq_gradient_file(self, directory: str, tag: str) -> str:
        return os.path.join(directory, str(tag), f"agoq_gradients_rank_{self.global_rank:05d}.pt")

    def _agoq_load_gradient_file(self, host: GradientHost, load_dir: str, tag: str) -> None:
        path = self._agoq_gradient_file(load_dir, tag)
        state = torch.load(path, map_location="cpu", weights_only=True) if os.path.exists(path) else None
        why = host.agoq_load_rank_state(state)
        if why is not None and state is not None:
            logger.warning(f"agoq: {path} is not restored: {why}; error feedback starts from zero")


def _hf_checkpointing_on(module: Any) -> bool:
    """Whether an HF model has gradient checkpointing switched on (either attribute name)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(module), name) or name in getattr(module, "__dict__", {}):
            return bool(getattr(module, name))
    return False


_HEADLINE = (
    "activation/avg_bits",
    "activation/compression",
    "gradient/comm_bytes_ratio_bf16",
    "gradient/buffer_bytes_ratio_fp32",
)


def _fmt(value: float) -> str:
    if abs(value) >= 1e4:
        return f"{value:.3e}"
    return f"{value:.4g}"


class AgoqEngine(AgoqEngineMixin, DeepSpeedEngine):
    """``DeepSpeedEngine`` with AGoQ activation and gradient quantization."""


class AgoqPipelineEngine(AgoqEngineMixin, PipelineEngine):
    """``PipelineEngine`` with AGoQ activation and gradient quantization (stage-aware bits)."""

    def _exec_forward_pass(self, buffer_id):
        # PipelineEngine calls DeepSpeedEngine.forward directly (past the mixin's forward).
        with self._agoq_compiled_scope():
            return super()._exec_forward_pass(buffer_id)

    def _exec_backward_pass(self, buffer_id):
        out = super()._exec_backward_pass(buffer_id)
        self._agoq_backward_done()
        return out

    def _exec_reduce_tied_grads(self):
        tied = [weight for weight, _ in self.module.get_tied_weights_and_groups()]
        if tied:
            # The tied-weight all-reduce reads param.grad / the BF16_Optimizer buffer: fill them first.
            host = self.agoq_gradient_path()
            if host is not None:
                host.agoq_materialize(tied)
        super()._exec_reduce_tied_grads()

    # PipelineEngine runs its instructions through this class-level table of its own functions, which
    # bypasses overrides: the agoq ones take their places.
    _INSTRUCTION_MAP = {
        **PipelineEngine._INSTRUCTION_MAP,
        pipe_schedule.ForwardPass: _exec_forward_pass,
        pipe_schedule.BackwardPass: _exec_backward_pass,
        pipe_schedule.ReduceTiedGrads: _exec_reduce_tied_grads,
    }


def assert_active(engine: Any) -> None:
    """Raise ``RuntimeError`` unless ``engine`` is an AGoQ engine with quantization switched on.

    For scripts that must never train silently without agoq (e.g. when the post-import hook was
    disabled or the ``"agoq"`` block went missing from the config).
    """
    if not isinstance(engine, AgoqEngineMixin):
        raise RuntimeError(
            f"agoq-ds is not active: deepspeed.initialize returned {type(engine).__name__}. Add an "
            f'"{CONFIG_KEY}" block to ds_config.json, use agoq_ds.initialize(...), or check that '
            "AGOQ_DS_AUTOLOAD is not 0."
        )
    cfg = engine.agoq_config
    grad_on = engine.agoq_gradient_path() is not None
    if not cfg.enabled or (engine.agoq_activation is None and not grad_on):
        raise RuntimeError("agoq-ds engine is built but quantizes nothing (agoq.enabled or both parts are off)")
