"""agoq-ds: AGoQ activation and gradient quantization for DeepSpeed.

Add an ``"agoq"`` block to ``ds_config.json`` and launch as usual; ``deepspeed.initialize`` then
returns the AGoQ engine. Public API (imported lazily, so ``import agoq_ds`` stays cheap):

* ``initialize(...)`` — ``deepspeed.initialize`` that always builds the AGoQ engine.
* ``assert_active(engine)`` — raise unless agoq is really on.
* ``AgoqConfig`` / ``parse_agoq_config`` / ``AgoqConfigError`` — the config block.
* ``AgoqEngine`` / ``AgoqPipelineEngine`` — the engine classes.
"""

from __future__ import annotations

import importlib

from . import _autoload  # noqa: F401  (registers the DeepSpeed post-import hook)

__version__ = "0.1.0"

_LAZY = {
    "initialize": "agoq_ds.deepspeed.integration",
    "assert_active": "agoq_ds.deepspeed.engine",
    "AgoqEngine": "agoq_ds.deepspeed.engine",
    "AgoqPipelineEngine": "agoq_ds.deepspeed.engine",
    "AgoqConfig": "agoq_ds.config",
    "AgoqConfigError": "agoq_ds.config",
    "parse_agoq_config": "agoq_ds.config",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'agoq_ds' has no attribute {name!r}")
