"""Deterministic stochastic-rounding seeds.

Every seed agoq hands to a quantizer is a pure function of where the tensor sits in training
(configured seed, rank, step or forward number, position in that step), never of how many tensors
were quantized before it in this process: a run resumed from a checkpoint rounds exactly as the
uninterrupted run did.
"""

from __future__ import annotations


def mix_seed(*parts: int) -> int:
    """A deterministic 31-bit seed from integers (Python's ``hash`` is not used: it is salted)."""
    h = 0x12345
    for p in parts:
        h = (h * 1000003) ^ (int(p) & 0xFFFFFFFF)
        h &= 0xFFFFFFFFFFFF
    return h % (2**31)
