"""Names shared across agoq-ds (kept dependency-free: imported while DeepSpeed itself is loading)."""

CONFIG_KEY = "agoq"
"""Top-level key of the agoq block in ``ds_config.json``."""

CHECKPOINT_KEY = "agoq"
"""Key of the agoq (model-level) state inside a DeepSpeed checkpoint's ``client_state``."""

MONITOR_PREFIX = "Train/agoq/"
"""Prefix of the monitor event names agoq writes (TensorBoard/CSV/W&B)."""

AUTOLOAD_ENV = "AGOQ_DS_AUTOLOAD"
"""Environment variable: ``0`` disables the automatic DeepSpeed patch."""
