"""``ActivationQuantizer``: the entry point that ties config, policy, pack hooks and reports together.

    quantizer = ActivationQuantizer(model, config.activation, stage_id=0, num_stages=1, micro_batches=1)
    quantizer.install()
    for batch in data:
        loss = model(**batch).loss; loss.backward(); optimizer.step()
        quantizer.on_step_end()          # drives tracing, calibration, per-step statistics
    print(quantizer.report())

Step 1 is traced (the model is classified when its first forward returns). In budget mode the
first ``budget.calibration_steps`` steps store activations unquantized while measuring each class's
quantization error; in stage-aware pipeline mode step 1 measures at the class-table bits. At the end
of those steps the allocators fix the bits (budget table, then per-stage balancing) and log them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..pipeline_support import PipelineSupport
from ..quant import Kernels
from .allocate import pipeline_holds
from .bit_allocator import BitAllocator
from .checkpoint import (
    QuantizingCheckpoint,
    is_pipeline_module,
    restore_hf_checkpoint_function,
    set_hf_checkpoint_function,
    swap_pipeline_checkpoint_function,
)
from .compiled import CompiledPacking
from .hooks import PackEngine
from .policy import BitPolicy
from .report import Snapshot, render, stats_of
from .storage import QuantSpec

if TYPE_CHECKING:
    from ..config import ActivationConfig

logger = logging.getLogger("agoq_ds.activation")

STATE_VERSION = 1
"""Version of ``ActivationQuantizer.state_dict``."""


def _log(msg: str) -> None:
    from deepspeed.utils import logger

    logger.info(msg)


class ActivationQuantizer:
    """Layer-aware quantization of the activations a model saves for backward (see module docstring).

    ``stage_id``/``num_stages``/``micro_batches`` describe the pipeline position (1F1B holds
    ``max(2, min(S - s, M))`` micro-batches on stage ``s``); ``seed`` drives stochastic rounding;
    ``process_group`` is where stage-aware mode gathers the other stages' measurements (default:
    the whole world, when ``torch.distributed`` is initialised); ``log_report`` logs ``report()``
    once, after the first step (the AGoQ engine does that itself); ``pipeline`` recognises a
    ``PipelineModule`` and DeepSpeed's checkpoint function (default: the one installed in
    ``agoq_ds.pipeline_support``, which ``agoq_ds.deepspeed`` fills in); ``kernels`` runs the quantize and
    dequantize ops (the engine's ``agoq_kernels``; default: the process default).
    """

    def __init__(
        self,
        model: nn.Module,
        config: ActivationConfig,
        *,
        stage_id: int = 0,
        num_stages: int = 1,
        micro_batches: int = 1,
        seed: int = 0,
        process_group: Any = None,
        log_report: bool = False,
        pipeline: PipelineSupport | None = None,
        kernels: Kernels | None = None,
    ) -> None:
        self.model = model
        self.pipeline = pipeline
        """How to recognise a ``PipelineModule`` and DeepSpeed's checkpoint function (``None``: the
        installed ``pipeline_support.installed()``; the AGoQ engine passes DeepSpeed's)."""
        self.config = config
        self.stage_id = stage_id
        self.num_stages = num_stages
        self.micro_batches = micro_batches
        self.holds = pipeline_holds(stage_id, num_stages, micro_batches)
        """Micro-batches this stage holds at its peak under 1F1B."""
        scale_dtype = torch.bfloat16 if config.scale_dtype == "bf16" else torch.float32
        self.spec = QuantSpec(config.group_size, scale_dtype, config.rounding == "stochastic", kernels)
        self.policy = BitPolicy(config, stage_id)
        """Bits per (module, class)."""
        self.allocator = BitAllocator(
            config,
            self.policy,
            self.spec,
            stage_id=stage_id,
            num_stages=num_stages,
            holds=self.holds,
            process_group=process_group,
        )
        """Calibration and budget handling (which steps measure, the bits fixed after them)."""
        self.engine = PackEngine(
            model,
            self.policy.bits,
            self.spec,
            config.min_numel,
            seed,
            on_saved=self.allocator.observe if self.allocator.steps else None,
            recompute=config.recompute,
        )
        """The pack/unpack machinery (hooks, trace, ledger)."""
        self.engine.recorder.enabled = bool(config.enabled)
        self.engine.recorder.calibrating = self.allocator.budget
        self.checkpoint_function = QuantizingCheckpoint(self.engine)
        """Quantizing checkpoint function for ``PipelineModule(activation_checkpoint_func=...)``,
        HF's ``_gradient_checkpointing_func`` or in place of ``deepspeed.checkpointing.checkpoint``."""
        self.step = 0
        """Optimizer steps seen (``on_step_end`` calls)."""
        self._snapshot: Snapshot | None = None
        self._log_report = log_report
        self._traced = False
        self._pipeline_previous = None
        self._loss_previous = None
        self._hf_previous: dict | None = None
        self._compiled: CompiledPacking | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    def install(self) -> ActivationQuantizer:
        """Register the hooks (and use the quantizing checkpoint function in a ``PipelineModule``
        that checkpoints with DeepSpeed's own one)."""
        if not self.engine.recorder.enabled:
            return self
        self.engine.install()
        if self.config.checkpointing:
            self._pipeline_previous = swap_pipeline_checkpoint_function(
                self.model, self.checkpoint_function, self.pipeline
            )
        loss_fn = getattr(self.model, "loss_fn", None)
        if is_pipeline_module(self.model, self.pipeline) and callable(loss_fn) and not isinstance(loss_fn, nn.Module):
            # The pipeline engine calls loss_fn outside the module's forward; run it in the root scope.
            self._loss_previous = loss_fn
            self.model.loss_fn = self.engine.scoped(loss_fn)
        return self

    def remove(self) -> None:
        """Undo ``install`` and ``enable_hf_gradient_checkpointing``'s function swap."""
        self.engine.remove()
        if self._loss_previous is not None:
            self.model.loss_fn = self._loss_previous
            self._loss_previous = None
        if self._pipeline_previous is not None:
            self.model.activation_checkpoint_func = self._pipeline_previous
            self._pipeline_previous = None
        if self._hf_previous is not None:
            restore_hf_checkpoint_function(self._hf_previous)
            self._hf_previous = None

    def enable_hf_gradient_checkpointing(self, model: nn.Module | None = None) -> None:
        """Turn on HF activation checkpointing for ``model`` (default: the quantized model) with the
        quantizing checkpoint function, so the checkpointed layer inputs are stored quantized."""
        self._hf_previous = set_hf_checkpoint_function(model or self.model, self.checkpoint_function)

    def on_step_end(self) -> None:
        """Call once per optimizer step: closes the step's statistics, ends tracing after the first
        step and, at the end of calibration, fixes the bits."""
        self.step += 1
        ledger = self.engine.ledger
        self._snapshot = Snapshot(
            self.step,
            len(ledger.forwards),
            dict(ledger.by_class),  # reset_usage below starts new dicts: these stay as they are
            dict(ledger.by_module),
            ledger.peak_stored,
            ledger.peak_baseline,
            ledger.peak_bf16,
            calibration=self.engine.recorder.calibrating,
        )
        if not self._traced and ledger.forwards:
            self._traced = True
            self.engine.stop_tracing()
        if self.allocator.end_step(self.step, len(ledger.forwards)):
            self._bits_fixed()
        if self._compiled is not None:
            self._compiled.backward_done()  # a backward outside the engine's (loss.backward()) freed them too
            for line in self._compiled.news():
                logger.warning(line)
        ledger.reset_usage()
        ledger.reset_peaks()
        if self._log_report and self._snapshot.forwards:
            self._log_report = False
            _log("agoq activation storage measured in the first step:\n" + self.report())

    def _bits_fixed(self) -> None:
        """Calibration ended: store at the fixed bits from now on (plans recorded before are stale)."""
        recorder = self.engine.recorder
        recorder.on_saved, recorder.calibrating = None, False
        self.engine.invalidate_plans()
        if self._compiled is not None:
            self._compiled.refresh()

    # --- torch.compile -------------------------------------------------------------------------------

    @property
    def eager_needed(self) -> bool:
        """Whether the next forward must run uncompiled: the classification is learnt from the first
        step's eager forwards and calibration measures in eager mode (``compiled.py``)."""
        return bool(self.engine.recorder.enabled) and (not self._traced or bool(self.engine.recorder.calibrating))

    @property
    def compiled_in_use(self) -> bool:
        """Whether compiled forwards have stored tensors through ``compiled()``'s hooks."""
        return self._compiled is not None and self._compiled.runs > 0

    def compiled(self) -> CompiledPacking:
        """The saved-tensor hooks for the compiled model (made once; same ledger, policy and
        classification as eager mode)."""
        if self._compiled is None:
            classifier = self.engine.classifier
            index = {name: i for i, name in enumerate(classifier.names)}

            def class_of(name: str) -> str:
                return self.engine.structure.class_of(index.get(name, 0))

            self._compiled = CompiledPacking(
                self.model,
                self.policy.bits,
                class_of,
                self.spec,
                self.config.min_numel,
                self.engine.ledger,
                recompute=self.config.recompute,
            )
        return self._compiled

    @property
    def sensitivity(self) -> dict[str, dict[int, float]]:
        """Measured relative quantization error per class and bits (after calibration)."""
        return self.allocator.sensitivity

    @property
    def stage_peaks(self) -> dict[str, dict[int, int]]:
        """Stage-aware mode: modelled per-stage peak stored bytes ``before``/``after`` balancing."""
        return self.allocator.stage_peaks

    @property
    def decisions(self) -> list[str]:
        """What the allocators decided, as logged."""
        return self.allocator.decisions

    # --- reporting ---------------------------------------------------------------------------------

    def _current(self) -> Snapshot:
        if self._snapshot is not None:
            return self._snapshot
        ledger = self.engine.ledger
        return Snapshot(
            self.step,
            len(ledger.forwards),
            dict(ledger.by_class),
            dict(ledger.by_module),
            ledger.peak_stored,
            ledger.peak_baseline,
            ledger.peak_bf16,
        )

    def table(self) -> dict[str, int]:
        """The effective class -> bits table (after budget mode and class-wide rules)."""
        return self.policy.table()

    def stats(self, per_module: bool = False) -> dict[str, float]:
        """Statistics of the last completed step (or of the current one before any step ended).

        ``stored_bytes_peak`` / ``baseline_bytes_peak`` / ``bf16_bytes_peak``: peak live bytes held
        versus what the unquantized (or bf16) tensors would hold; ``live_bytes``: held right now;
        ``*_per_forward``: per micro-batch; ``avg_bits``: stored bits per saved element, scales
        included; ``compression``: unquantized / stored; ``ratio_vs_bf16``: stored / bf16; per
        class ``class/<name>/{bits,elements,stored_bytes,baseline_bytes,avg_bits}`` and, with
        ``per_module``, ``module/<module>/<class>/{elements,stored_bytes,baseline_bytes}`` (all per
        micro-batch). Once compiled (``compiled()``): ``compiled_graphs`` (graphs that store through
        agoq's hooks) and ``compiled_runs`` (their runs so far).
        """
        stats = stats_of(self._current(), self.table(), self.engine.ledger.live_stored, per_module)
        if self._compiled is not None:
            stats["compiled_graphs"] = len(self._compiled.graphs)
            stats["compiled_runs"] = self._compiled.runs
        return stats

    def report(self, per_layer: bool = False) -> str:
        """Human-readable table: per class (and per layer with ``per_layer``) bits, stored bytes,
        bf16-equivalent and unquantized bytes, average bits and compression."""
        mode = (
            self.config.policy
            + (", budget" if self.allocator.budget else "")
            + (", stage-aware" if self.allocator.stage_aware else "")
        )
        title = f"agoq activations [{mode}] stage {self.stage_id}/{self.num_stages}"
        text = render(
            self._current(),
            self.table(),
            title=title,
            per_layer=per_layer,
            layer_of=self._layer_of,
            overrides=self.policy.overrides,
        )
        if self.decisions:
            text += "\n" + "\n".join(self.decisions)
        return text

    def _layer_of(self, module: str) -> str:
        parts = module.split(".") if module else []
        for j, part in enumerate(parts):
            if part.isdigit():
                return ".".join(parts[: j + 1])
        return ""

    def classes(self) -> dict[str, str]:
        """Module name -> layer class of its own scope (``"<root>"`` for the root), as classified."""
        names = self.engine.classifier.names
        return {names[i] or "<root>": c for i, c in self.engine.structure.classes.items()}

    # --- state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Policy table, calibration results and the number of forwards run (it seeds stochastic
        rounding) (plain ints/floats/strings: loadable with ``torch.load(weights_only=True)``)."""
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "forwards": self.engine.forwards,
            "class_bits": dict(self.policy.class_bits),
            "overrides": {f"{m}|{c}": b for (m, c), b in self.policy.overrides.items()},
            **self.allocator.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (a calibrated table is not re-calibrated)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"activation quantizer state version {state.get('version')} != {STATE_VERSION}")
        self.step = int(state["step"])
        # The forward number seeds stochastic rounding: a resumed run rounds as the uninterrupted one.
        self.engine.forwards = int(state.get("forwards", self.engine.forwards))
        self.policy.set_class_bits({str(k): int(v) for k, v in state["class_bits"].items()})
        self.policy.set_overrides({tuple(k.split("|", 1)): int(v) for k, v in state["overrides"].items()})
        self.allocator.load_state_dict(state)
        self.engine.invalidate_plans()
        if self.allocator.calibrated:
            self._bits_fixed()
