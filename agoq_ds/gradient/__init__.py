"""8-bit gradients (QuanGrad), the DeepSpeed-free core: collectives, accumulators, the shared host
lifecycle. The DeepSpeed optimizer subclasses that use it live in ``agoq_ds.deepspeed``.

* ``collectives``: the 8-bit reduce-scatter (int8 + fp32 scales per group on the wire, fp32 sum at the
  owner) and the all-reduce built on it; ``allreduce``: that all-reduce chunk by chunk.
* ``accumulator``: int8 accumulation with error feedback (fp32 below ``min_numel``).
* ``store.GradientStore``: what every host shares (seeds, accumulators, the step boundary,
  statistics, checkpoint state); ``host.GradientHost``: the one interface the engine talks to.
* ``param_grads.ParamGradients``: the host at ZeRO stage 0 without ``BF16_Optimizer`` (owned by the
  engine); the others are ``agoq_ds.deepspeed.zero_optimizer`` (ZeRO-1/2), ``stage3_optimizer``
  (ZeRO-3) and ``bf16_optimizer``.
"""

from .accumulator import Fp32Accumulator, Int8Accumulator
from .collectives import CommCounter, ReduceScatterResult, all_reduce_8bit, reduce_scatter_8bit
from .host import GradientHost
from .store import GradientStore

__all__ = [
    "CommCounter",
    "Fp32Accumulator",
    "GradientHost",
    "GradientStore",
    "Int8Accumulator",
    "ReduceScatterResult",
    "all_reduce_8bit",
    "reduce_scatter_8bit",
]
