"""Which parameters' gradients can meet an 8-bit quantizer, and which travel and rest exactly.

A gradient is on the **exact path** when no step can quantize it: every buffer that holds it between
backward and ``step()`` is fp32 (``storage_bits: 32``, or fewer than ``min_numel`` elements) and every
reduction it takes part in is exact (``communication_bits: 32``, one data-parallel rank, or a reduction
of fewer than ``min_numel`` elements). Otherwise it is on the **8-bit path**. The hosts decide this
once, at construction, from sizes alone; a reduction's size is bounded from above (a bucket holds at
most ``bucket_size`` elements, or the one parameter larger than that, and never more than all of
them), so a parameter reported as 8-bit may still, at run time, sit in a small exact bucket.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from ..config import GradientConfig

Path = Literal["exact", "8bit"]
"""A parameter's gradient path."""


def reduction_exact(config: GradientConfig, world_size: int, largest: int) -> bool:
    """Whether a reduction of at most ``largest`` elements over ``world_size`` ranks is exact."""
    return config.communication_bits == 32 or world_size <= 1 or largest < config.min_numel


def largest_bucket(numel: int, bucket_size: int, total: int) -> int:
    """The most elements a DeepSpeed reduction bucket holding a ``numel``-element parameter can hold:
    a bucket closes before it passes ``bucket_size``, and a larger parameter travels alone."""
    return min(total, numel if numel > bucket_size else int(bucket_size))


def path(storage_exact: bool, reduction_is_exact: bool) -> Path:
    """``"exact"`` when neither storage nor reduction quantizes."""
    return "exact" if storage_exact and reduction_is_exact else "8bit"


def count_paths(paths: Iterable[Path]) -> dict[str, float]:
    """``{"params_exact": n, "params_8bit": m}`` for the start-up summary and ``agoq_stats``."""
    values = list(paths)
    return {"params_exact": float(values.count("exact")), "params_8bit": float(values.count("8bit"))}
