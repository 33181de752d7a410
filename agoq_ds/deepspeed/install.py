"""How the 8-bit gradient path gets into DeepSpeed, and which configurations it supports.

``DeepSpeedEngine._configure_zero_optimizer`` constructs the module-global name
``deepspeed.runtime.engine.DeepSpeedZeroOptimizer`` with about 30 version-specific arguments.
``agoq_zero_optimizer(cfg)`` rebinds that name, for the duration of the block only, to a subclass
of ``AgoqZeroOptimizer`` that carries ``cfg``, and ``deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3``
(which the engine imports when it builds a stage-3 optimizer) to one of ``AgoqStage3Optimizer``; DeepSpeed
then builds it with its own arguments::

    with agoq_zero_optimizer(agoq_config):
        engine, *_ = deepspeed.initialize(model=model, config=ds_config, ...)

``agoq_bf16_optimizer(cfg)`` does the same for ``deepspeed.runtime.engine.BF16_Optimizer`` (bf16 with
fp32 gradient accumulation at ZeRO stage 1, bf16 pipelines at stage 0). ZeRO stage 0 without
``BF16_Optimizer`` needs no swap: the AGoQ engine hangs a ``ParamGradients`` on itself.

What the 8-bit path refuses, and how it says so: ``unsupported``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from ..config import AgoqConfig

_lock = threading.RLock()


def _bound(module: str, name: str, agoq_config: AgoqConfig) -> type:
    from importlib import import_module

    base = getattr(import_module(module), name)
    return type(base.__name__, (base,), {"agoq_config": agoq_config, "__module__": __name__})


def optimizer_class(agoq_config: AgoqConfig) -> type:
    """A subclass of ``AgoqZeroOptimizer`` bound to ``agoq_config`` (constructible with exactly
    ``DeepSpeedZeroOptimizer``'s arguments)."""
    return _bound("agoq_ds.deepspeed.zero_optimizer", "AgoqZeroOptimizer", agoq_config)


def bf16_optimizer_class(agoq_config: AgoqConfig) -> type:
    """A subclass of ``AgoqBF16Optimizer`` bound to ``agoq_config`` (constructible with exactly
    ``BF16_Optimizer``'s arguments)."""
    return _bound("agoq_ds.deepspeed.bf16_optimizer", "AgoqBF16Optimizer", agoq_config)


def stage3_optimizer_class(agoq_config: AgoqConfig) -> type:
    """A subclass of ``AgoqStage3Optimizer`` bound to ``agoq_config`` (constructible with exactly
    ``DeepSpeedZeroOptimizer_Stage3``'s arguments)."""
    return _bound("agoq_ds.deepspeed.stage3_optimizer", "AgoqStage3Optimizer", agoq_config)


@contextmanager
def _rebound(module: str, name: str, cls: type) -> Iterator[type]:
    """``module.name`` is ``cls`` inside the block (under the lock), DeepSpeed's class again after it."""
    from importlib import import_module

    target = import_module(module)
    with _lock:
        saved = getattr(target, name)
        setattr(target, name, cls)
        try:
            yield cls
        finally:
            setattr(target, name, saved)


@contextmanager
def agoq_zero_optimizer(agoq_config: AgoqConfig) -> Iterator[type]:
    """Make DeepSpeed build agoq's ZeRO optimizers inside the block: ``AgoqZeroOptimizer`` for stages
    1/2 (rebinds ``deepspeed.runtime.engine.DeepSpeedZeroOptimizer``) and ``AgoqStage3Optimizer`` for
    stage 3 (rebinds ``deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3``, which the engine
    imports when it builds one). Yields the stage 1/2 class."""
    with (
        _rebound("deepspeed.runtime.engine", "DeepSpeedZeroOptimizer", optimizer_class(agoq_config)) as cls,
        _rebound("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3", stage3_optimizer_class(agoq_config)),
    ):
        yield cls


@contextmanager
def agoq_bf16_optimizer(agoq_config: AgoqConfig) -> Iterator[type]:
    """Make DeepSpeed build ``AgoqBF16Optimizer`` wherever it would build ``BF16_Optimizer`` inside the
    block (rebinds ``deepspeed.runtime.engine.BF16_Optimizer`` under the lock; yields the class)."""
    with _rebound("deepspeed.runtime.engine", "BF16_Optimizer", bf16_optimizer_class(agoq_config)) as cls:
        yield cls
