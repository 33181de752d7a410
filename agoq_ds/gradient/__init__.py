"""8-bit gradients for DeepSpeed (QuanGrad): collectives, accumulators, the optimizers.

Data paths, top to bottom:

* ZeRO-1/2: ``zero_optimizer.AgoqZeroOptimizer`` (DeepSpeed's ZeRO-1/2 optimizer with the bucket
  reduction and partition storage replaced) → ``layout`` (a bucket's owner map) → ``collectives``
  (8-bit reduce-scatter) and ``accumulator`` (int8 + error feedback) → ``agoq_ds.quant``.
* ZeRO-3: ``stage3_optimizer.AgoqStage3Optimizer`` (DeepSpeed's stage-3 optimizer with the bucket
  reduce-scatter and the flat gradient partition replaced) → ``collectives`` / ``accumulator``.
* No gradient partitioning: ``bf16_optimizer.AgoqBF16Optimizer`` (DeepSpeed's ``BF16_Optimizer`` with
  an int8 accumulation buffer) or, at ZeRO stage 0 otherwise, ``param_grads.ParamGradients`` (int8
  ``param.grad`` accumulation, owned by the engine) → ``allreduce`` (chunked 8-bit all-reduce) →
  ``collectives`` / ``accumulator`` → ``agoq_ds.quant``.

``store.GradientStore`` is what every host shares: seeds, accumulators, the step boundary, statistics
and checkpoint state. ``install`` swaps the optimizers into ``deepspeed.initialize`` and checks configs.
"""

from .accumulator import Fp32Accumulator, Int8Accumulator
from .collectives import CommCounter, ReduceScatterResult, all_reduce_8bit, reduce_scatter_8bit
from .install import (
    UnsupportedConfigError,
    agoq_bf16_optimizer,
    agoq_zero_optimizer,
    bf16_optimizer_class,
    check_supported,
    optimizer_class,
    stage3_optimizer_class,
)

__all__ = [
    "CommCounter",
    "Fp32Accumulator",
    "Int8Accumulator",
    "ReduceScatterResult",
    "UnsupportedConfigError",
    "agoq_bf16_optimizer",
    "agoq_zero_optimizer",
    "all_reduce_8bit",
    "bf16_optimizer_class",
    "check_supported",
    "optimizer_class",
    "reduce_scatter_8bit",
    "stage3_optimizer_class",
]
