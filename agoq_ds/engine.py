"""The AGoQ engines: ``DeepSpeedEngine`` and ``PipelineEngine`` subclasses sharing one mixin.

At construction the mixin validates the ``"agoq"`` block and rejects unsupported combinations
before DeepSpeed builds anything, swaps the 8-bit ZeRO-1/2 optimizer in while DeepSpeed constructs
its optimizer, installs the activation quantizer once the model (and pipeline stage) is known, and
prints one start-up summary on rank 0. Every ``steps_per_print`` optimizer steps it publishes the
agoq statistics to DeepSpeed's monitor (TensorBoard/CSV/W&B). Checkpoints carry the agoq state.
"""

from __future__ import annotations

from typing import Any

import deepspeed
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.utils import log_dist
from deepspeed.utils.logging import print_dist

from . import quant
from ._compat import check_deepspeed_version
from .config import AgoqConfig, AgoqConfigError, parse_agoq_config
from .constants import CHECKPOINT_KEY, CONFIG_KEY, MONITOR_PREFIX
from .summary import startup_summary

check_deepspeed_version(deepspeed.__version__)


def _ds_config_dict(kwargs: dict[str, Any]) -> dict[str, Any]:
    config_class = kwargs.get("config_class")
    if config_class is not None:
        return config_class._param_dict
    from .integration import find_ds_config

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
        super().__init__(*args, **kwargs)
        self._agoq_install_activation()
        if self.agoq_config.log_summary:
            print_dist(startup_summary(self), ranks=[0])

    @staticmethod
    def _agoq_check_before_build(ds_config: dict[str, Any], agoq_config: AgoqConfig) -> None:
        from .gradient.install import check_supported

        if agoq_config.kernel_backend != "auto":
            try:
                quant.set_preferred(agoq_config.kernel_backend)
            except quant.BackendUnavailable as exc:
                available = [s.name for s in quant.all_status() if s.available]
                raise AgoqConfigError(
                    f"agoq.kernel_backend={agoq_config.kernel_backend!r}: {exc}; available here: auto, "
                    + ", ".join(available)
                ) from None
        if agoq_config.enabled and agoq_config.gradient.enabled:
            check_supported(ds_config, agoq_config)

    # --- construction hooks -------------------------------------------------------------------

    def _configure_zero_optimizer(self, optimizer):
        from .gradient.install import agoq_zero_optimizer

        if not (self.agoq_config.enabled and self.agoq_config.gradient.enabled):
            return super()._configure_zero_optimizer(optimizer)
        with agoq_zero_optimizer(self.agoq_config):
            return super()._configure_zero_optimizer(optimizer)

    def _agoq_install_activation(self) -> None:
        cfg = self.agoq_config
        if not (cfg.enabled and cfg.activation.enabled):
            return
        from .activation.quantizer import ActivationQuantizer

        quantizer = ActivationQuantizer(
            self.module,
            cfg.activation,
            stage_id=getattr(self, "stage_id", 0),
            num_stages=getattr(self, "num_stages", 1),
            micro_batches=self.gradient_accumulation_steps(),
            seed=cfg.seed,
        )
        quantizer.install()
        if _hf_checkpointing_on(self.module) and cfg.activation.checkpointing:
            quantizer.enable_hf_gradient_checkpointing(self.module)
        object.__setattr__(self, "agoq_activation", quantizer)

    # --- training-time hooks ------------------------------------------------------------------

    def _take_model_step(self, lr_kwargs):
        super()._take_model_step(lr_kwargs)
        if self.agoq_activation is not None:
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
        optimizer_stats = getattr(self.optimizer, "agoq_stats", None)
        if callable(optimizer_stats):
            stats.update({f"gradient/{k}": float(v) for k, v in optimizer_stats().items()})
        return stats

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
        """DeepSpeed's ``save_checkpoint`` with the agoq state added to ``client_state``."""
        client_state = dict(client_state or {})
        client_state[CHECKPOINT_KEY] = self.agoq_state_dict()
        return super().save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=save_latest, **kwargs)

    def load_checkpoint(self, load_dir, *args, **kwargs):
        """DeepSpeed's ``load_checkpoint``; restores the agoq state when the checkpoint has one (a
        stock checkpoint keeps the freshly configured state)."""
        load_path, client_state = super().load_checkpoint(load_dir, *args, **kwargs)
        if isinstance(client_state, dict) and CHECKPOINT_KEY in client_state:
            self.agoq_load_state_dict(client_state.pop(CHECKPOINT_KEY))
        return load_path, client_state


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
    grad_on = callable(getattr(getattr(engine, "optimizer", None), "agoq_stats", None))
    if not cfg.enabled or (engine.agoq_activation is None and not grad_on):
        raise RuntimeError("agoq-ds engine is built but quantizes nothing (agoq.enabled or both parts are off)")
