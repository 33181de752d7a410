"""How agoq-ds enters ``deepspeed.initialize`` without changes to the user's script.

``deepspeed.initialize`` looks up the module globals ``DeepSpeedEngine`` and ``PipelineEngine`` by
name and has no extension hook. ``patch_deepspeed`` wraps it: when the config carries an ``"agoq"``
block, those two names are rebound to the AGoQ engine classes *for the duration of that one call*
(under a lock) and restored afterwards, so ``isinstance(x, deepspeed.DeepSpeedEngine)`` elsewhere
(accelerate, HF Trainer) keeps working. Configs without the block never touch agoq code. Where the
config comes from: ``config_source``.
"""

from __future__ import annotations

import copy
import functools
import threading
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from ..constants import CONFIG_KEY
from .config_source import find_ds_config, wants_agoq

_lock = threading.RLock()
_PATCHED_ATTR = "__agoq_ds_patched__"


@contextmanager
def agoq_engines(deepspeed_module: ModuleType):
    """Rebind ``deepspeed.DeepSpeedEngine``/``PipelineEngine`` to the AGoQ engines inside the block."""
    from .engine import AgoqEngine, AgoqPipelineEngine

    with _lock:
        saved = deepspeed_module.DeepSpeedEngine, deepspeed_module.PipelineEngine
        deepspeed_module.DeepSpeedEngine = AgoqEngine
        deepspeed_module.PipelineEngine = AgoqPipelineEngine
        try:
            yield
        finally:
            deepspeed_module.DeepSpeedEngine, deepspeed_module.PipelineEngine = saved


def _call_args(args: tuple, kwargs: dict) -> Any:
    return kwargs.get("args", args[0] if args else None)


def initialize(args: Any = None, **kwargs: Any):
    """``deepspeed.initialize`` that always builds the AGoQ engine (the explicit form).

    Same arguments and return value as ``deepspeed.initialize``. A config without an ``"agoq"``
    block gets AGoQ's defaults; ``"agoq": {"enabled": false}`` gives the stock engine.
    """
    import deepspeed

    ds_config = find_ds_config(args, kwargs.get("config"), kwargs.get("config_params"))
    if ds_config is None:
        raise ValueError(
            "agoq_ds.initialize: no DeepSpeed config (pass config=, config_params= or args.deepspeed_config)"
        )
    kwargs.pop("config_params", None)
    kwargs["config"] = {CONFIG_KEY: {}, **ds_config}
    if getattr(args, "deepspeed_config", None) is not None:
        args = copy.copy(args)
        args.deepspeed_config = None
    original = getattr(deepspeed.initialize, "__wrapped__", deepspeed.initialize)
    if not wants_agoq(kwargs["config"]):
        return original(args=args, **kwargs)
    with agoq_engines(deepspeed):
        return original(args=args, **kwargs)


def patch_deepspeed(deepspeed_module: ModuleType) -> None:
    """Wrap ``deepspeed.initialize`` so configs with an ``"agoq"`` block get the AGoQ engine (idempotent).

    On a DeepSpeed version agoq-ds was not tested with, stock configs keep working but a config
    with an ``"agoq"`` block fails at ``initialize`` with ``UntestedDeepSpeedError``.
    """
    from .. import pipeline_support
    from .._compat import UntestedDeepSpeedError, check_deepspeed_version
    from .internals import PIPELINE

    pipeline_support.install(PIPELINE)  # a bare ActivationQuantizer on a PipelineModule swaps its checkpointing
    if getattr(deepspeed_module.initialize, _PATCHED_ATTR, False):
        return
    try:
        check_deepspeed_version(deepspeed_module.__version__)
        version_error = None
    except UntestedDeepSpeedError as exc:
        version_error = exc
    original = deepspeed_module.initialize

    @functools.wraps(original)
    def initialize_with_agoq(*args: Any, **kwargs: Any):
        ds_config = find_ds_config(_call_args(args, kwargs), kwargs.get("config"), kwargs.get("config_params"))
        if not wants_agoq(ds_config):
            return original(*args, **kwargs)
        if version_error is not None:
            raise version_error
        with agoq_engines(deepspeed_module):
            return original(*args, **kwargs)

    setattr(initialize_with_agoq, _PATCHED_ATTR, True)
    deepspeed_module.initialize = initialize_with_agoq


def is_patched() -> bool:
    """True when ``deepspeed.initialize`` routes ``"agoq"`` configs to the AGoQ engine."""
    import sys

    ds = sys.modules.get("deepspeed")
    return bool(ds is not None and getattr(ds.initialize, _PATCHED_ATTR, False))
