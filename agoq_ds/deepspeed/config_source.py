"""Where ``deepspeed.initialize`` finds its config, and whether that config asks for agoq.

The config may arrive as ``config=`` (dict or path), ``config_params=`` (accelerate, HF Trainer)
or ``args.deepspeed_config`` (the ``deepspeed`` launcher's ``--deepspeed_config``).
"""

from __future__ import annotations

from typing import Any

from ..constants import CONFIG_KEY


def find_ds_config(args: Any = None, config: Any = None, config_params: Any = None) -> dict[str, Any] | None:
    """The DeepSpeed config dict ``deepspeed.initialize`` will use (read with DeepSpeed's own loader:
    a dict, a JSON/hjson file path, or base64), or ``None`` when there is none."""
    from .internals import load_ds_config

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
