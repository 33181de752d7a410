"""How agoq-ds enters ``deepspeed.initialize`` without changes to the user's script.

``deepspeed.initialize`` looks up the module globals ``DeepSpeedEngine`` and ``PipelineEngine`` by
name and has no extension hook. ``patch_deepspeed`` wraps it: when the config carries an ``"agoq"``
block, those two names are rebound to the AGoQ engine classes *for the duration of that one call*
(under a lock) and restored afterwards, so ``isinstance(x, deepspeed.DeepSpeedEngine)`` elsewhere
(accelerate, HF Trainer) keeps working. Configs without the block never touch agoq code.

The config may arrive as ``config=`` (dict or path), ``config_params=`` (accelerate, HF Trainer)
or ``args.deepspeed_config`` (the ``deepspeed`` launcher's ``--deepspeed_config``).
"""

from __future__ import annotations

import copy
import functools
import threading
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from .constants import CONFIG_KEY

_lock = threading.RLock()
_PATCHED_ATTR = "__agoq_ds_patched__"


def find_ds_config(args: Any = None, config: Any = None, config_params: Any = None) -> dict[str, Any] | None:
    """The DeepSpeed config dict ``deepspeed.initialize`` will use (read with DeepSpeed's own loader:
    a dict, a JSON/hjson file path, or base64), or ``None`` when there is none."""
    from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config

    source = config if config is not None else config_params
    if source is None and args is not None:
        source = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if source is None:
        return None
    try:
        return load_ds_config(source)
    except ValueError:
        return None  # DeepSpeed itself reports the bad config


def wants_agoq(ds_config: dict[str, Any] | None) -> bool:
    """True when the config has an ``"agoq"`` block that is not switched off."""
    if not isinstance(ds_config, dict) or CONFIG_KEY not in ds_config:
        return False
    block = ds_config[CONFIG_KEY]
    if block is False:
        return False
    return not (isinstance(block, dict) and block.get("enabled", True) is False)


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
    from ._compat import UntestedDeepSpeedError, check_deepspeed_version

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
