"""8-bit gradients for DeepSpeed ZeRO-1/2 (QuanGrad): collectives, accumulators, the optimizer.

Data path, top to bottom: ``zero_optimizer.AgoqZeroOptimizer`` (DeepSpeed's ZeRO-1/2 optimizer with
the bucket reduction and partition storage replaced) → ``layout`` (a bucket's owner map) →
``collectives`` (8-bit reduce-scatter / all-reduce) and ``accumulator`` (int8 + error feedback) →
``agoq_ds.quant``. ``install`` swaps the optimizer into ``deepspeed.initialize`` and checks configs.
"""

from .accumulator import Fp32Accumulator, Int8Accumulator
from .collectives import CommCounter, ReduceScatterResult, all_reduce_8bit, reduce_scatter_8bit
from .install import UnsupportedConfigError, agoq_zero_optimizer, check_supported, optimizer_class

__all__ = [
    "CommCounter",
    "Fp32Accumulator",
    "Int8Accumulator",
    "ReduceScatterResult",
    "UnsupportedConfigError",
    "agoq_zero_optimizer",
    "all_reduce_8bit",
    "check_supported",
    "optimizer_class",
    "reduce_scatter_8bit",
]
