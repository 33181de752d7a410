"""The DeepSpeed versions agoq-ds is tested with, and the import-time guard."""

from __future__ import annotations

import os

TESTED_DEEPSPEED = ("0.19.8",)
"""DeepSpeed releases whose private internals (ZeRO buckets, engine hooks) agoq-ds was verified on; the
last is the one the source hashes of ``agoq_ds/deepspeed/contract.py`` were taken from (the only place
a DeepSpeed version is written)."""

ALLOW_ENV = "AGOQ_DS_ALLOW_UNTESTED_DEEPSPEED"
"""Set to 1 to run on an untested DeepSpeed anyway (at your own risk)."""


class UntestedDeepSpeedError(ImportError):
    """agoq-ds patches DeepSpeed internals and refuses a DeepSpeed version it was not tested with."""


def check_deepspeed_version(version: str) -> None:
    """Raise ``UntestedDeepSpeedError`` unless ``version`` is tested or the override is set."""
    base = version.split("+")[0]
    if base in TESTED_DEEPSPEED or os.environ.get(ALLOW_ENV) == "1":
        return
    raise UntestedDeepSpeedError(
        f"agoq-ds is tested with deepspeed=={', '.join(TESTED_DEEPSPEED)} but found deepspeed {version}. "
        f"Install a tested version (pip install deepspeed=={TESTED_DEEPSPEED[-1]}) or set {ALLOW_ENV}=1."
    )
