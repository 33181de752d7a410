"""Memory planner: per-rank memory of LLaMA-family training, stock versus agoq (``agoq-ds plan``).

The model: bf16 weights with fp32 master weights and Adam moments (``2 + 12`` bytes per parameter,
the optimizer part divided by the data-parallel size under ZeRO >= 1, the weights too under ZeRO-3);
an fp32 gradient accumulation buffer (4 bytes per parameter, divided by the data-parallel size under
ZeRO-2/3) versus agoq's int8 codes + fp32 scale per group (plus the error-feedback residual when
enabled); and the activations autograd saves, tensor by tensor, as HF's LLaMA implementation saves
them with SDPA (norm inputs in fp32, projection inputs, SDPA's q/k/v/output/logsumexp, the MLP's
gate/up/act tensors, the loss's log-probabilities), each stored at its class's bits by agoq. Under a 1F1B
pipeline stage ``s`` holds ``max(2, min(S - s, M))`` micro-batches of activations. Tensor
parallelism divides weights and the attention/MLP-internal activations by ``tp`` (no sequence
parallelism). The peak is the larger of backward's (gradients, stored activations, and agoq's
working set: one decoder block's or the loss head's saved tensors at full width, quantized as they
are saved and dequantized or rebuilt as backward reaches them) and the accumulation boundary's
(agoq's int8 state beside the fp32 buffer it is reduced into, as large as stock's); a gradient bucket
reduction in flight adds agoq's temporaries to the phase it runs in (``reduction_working_set``).
ZeRO-Offload
(``offload_optimizer``/``offload_param``: ``Parallelism``) moves the optimizer state, the fp32
gradient partition and (ZeRO-3) the bf16 weight shards to host memory, reported per rank beside the
device figures (``StageMemory.host_total``). Tests check the activation and gradient predictions
against a real run (< 5%), the ZeRO-3 and offload figures against the bytes a run allocates, that
the working set covers what a measured step holds beyond its stored activations, and that the bucket
reduction's figure covers the live bytes a real reduction allocates.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .activation.allocate import pipeline_holds
from .config import AgoqConfig, parse_agoq_config
from .layer_classes import LOSS_HEAD_MIN_BITS, LayerClass
from .quant.format import quantized_bytes


@dataclass(frozen=True)
class ModelDims:
    """Dimensions of a LLaMA-family decoder."""

    name: str
    """Display name."""
    vocab: int
    """Vocabulary size."""
    hidden: int
    """Hidden size."""
    layers: int
    """Decoder blocks."""
    heads: int
    """Attention heads."""
    kv_heads: int
    """Key/value heads."""
    intermediate: int
    """MLP width."""
    tied_embeddings: bool = False
    """Whether the LM head shares the embedding matrix."""

    @property
    def head_dim(self) -> int:
        """Per-head width."""
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        """Width of the key (and value) projection."""
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        """Parameters of one decoder block."""
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_dim
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden

    def params(self) -> int:
        """All parameters."""
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.vocab * self.hidden + self.layers * self.layer_params() + self.hidden + head


NAMED_MODELS: dict[str, ModelDims] = {
    "llama-8b": ModelDims("LLaMA-3 8B", 128256, 4096, 32, 32, 8, 14336),
    "llama-13b": ModelDims("LLaMA-2 13B", 32000, 5120, 40, 40, 40, 13824),
    "llama-32b": ModelDims("LLaMA-arch 32B", 152064, 5120, 64, 40, 8, 27648),
    "llama-70b": ModelDims("LLaMA-3 70B", 128256, 8192, 80, 64, 8, 28672),
}
"""Named sizes (the 32B uses Qwen2.5-32B's LLaMA-architecture dimensions)."""


def dims_from_hf_config(path: str | Path) -> ModelDims:
    """``ModelDims`` from an HF ``config.json`` of a LLaMA/Mistral/Qwen2-style model."""
    cfg = json.loads(Path(path).read_text())
    return ModelDims(
        name=Path(path).stem if cfg.get("_name_or_path") is None else str(cfg["_name_or_path"]),
        vocab=cfg["vocab_size"],
        hidden=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"],
        heads=cfg["num_attention_heads"],
        kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        intermediate=cfg["intermediate_size"],
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


OFFLOAD_DEVICES = ("none", "cpu")
"""Offload devices the planner models (ZeRO-Infinity's ``nvme`` is not planned: agoq refuses it at
ZeRO-3 and DeepSpeed runs it as ``cpu`` at ZeRO-1/2)."""


@dataclass(frozen=True)
class Parallelism:
    """How the job is laid out and batched."""

    seq_len: int = 4096
    """Tokens per sequence."""
    micro_batch: int = 1
    """Sequences per micro-batch per GPU."""
    micro_batches: int = 8
    """Micro-batches per optimizer step (gradient accumulation steps)."""
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline stages."""
    dp: int = 1
    """Data-parallel size."""
    zero: int = 1
    """ZeRO stage (0 to 3)."""
    offload_optimizer: str = "none"
    """``zero_optimization.offload_optimizer.device``: ``"none"`` or ``"cpu"`` (ZeRO 1-3): the fp32 master
    weights, Adam moments and gradient partition live in host memory and the optimizer steps there."""
    offload_param: str = "none"
    """``zero_optimization.offload_param.device``: ``"none"`` or ``"cpu"`` (ZeRO-3 only): the bf16 weight
    shards live in host memory and are gathered to the device as layers run."""
    reduce_bucket_size: int = 500_000_000
    """``zero_optimization.reduce_bucket_size`` (DeepSpeed's default): elements per gradient bucket, the
    unit agoq's 8-bit reduce-scatter reduces at once (``StageMemory.reduction``)."""

    def __post_init__(self) -> None:
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"zero={self.zero}: the ZeRO stage is 0, 1, 2 or 3")
        for key in ("offload_optimizer", "offload_param"):
            if getattr(self, key) not in OFFLOAD_DEVICES:
                raise ValueError(f"{key}={getattr(self, key)!r}: must be one of {', '.join(OFFLOAD_DEVICES)}")
        if self.offload_param != "none" and self.zero != 3:
            raise ValueError(
                f"offload_param={self.offload_param!r} at ZeRO-{self.zero}: DeepSpeed offloads parameters only "
                "at ZeRO-3 (below it ignores the offload_param block, so the weights stay on the device); "
                "use zero=3 or offload_param='none'"
            )
        if self.offload_optimizer != "none" and self.zero == 0:
            raise ValueError(
                f"offload_optimizer={self.offload_optimizer!r} at ZeRO-0: DeepSpeed offloads the optimizer only "
                "under ZeRO 1-3 (and agoq's gradient path refuses it at stage 0); use zero>=1 or "
                "offload_optimizer='none'"
            )

    @property
    def offloads(self) -> bool:
        """Whether anything lives in host memory."""
        return self.offload_optimizer != "none" or self.offload_param != "none"


@dataclass(frozen=True)
class Saved:
    """One tensor autograd saves per micro-batch."""

    cls: str
    """Its layer class."""
    numel: int
    """Elements."""
    elem_bytes: int
    """Bytes per element unquantized."""
    exact: bool = False
    """Kept unquantized by agoq (softmax/norm statistics)."""
    recomputable: bool = False
    """Rebuilt in backward from another saved tensor when ``activation.recompute`` is on."""
    min_bits: int = 0
    """Stored at no fewer bits than this whatever the policy (the loss's log-probabilities)."""


def layer_saved_tensors(d: ModelDims, tokens: int, tp: int = 1) -> list[Saved]:
    """What one decoder block saves for ``tokens`` tokens (bf16 model, SDPA), deduplicated.

    The output projection reads SDPA's output buffer, so that tensor is stored once (as SDPA's).
    """
    c = LayerClass
    h, kv, f = d.hidden, d.kv_dim, d.intermediate
    heads = d.heads // tp
    return [
        Saved(c.ATTN_NORM_INPUT, tokens * h, 4),  # input upcast to fp32
        Saved(c.ATTN_NORM_INPUT, tokens, 4, exact=True),  # rsqrt(variance)
        Saved(c.ATTN_NORM_INPUT, tokens * h, 2, recomputable=True),  # normalised value (weight's gradient)
        Saved(c.QKV_INPUT, tokens * h, 2, recomputable=True),  # the norm's output
        Saved(c.ATTN_CORE, tokens * h // tp, 2),  # SDPA q
        Saved(c.ATTN_CORE, tokens * kv // tp, 2),  # SDPA k
        Saved(c.ATTN_CORE, tokens * heads, 4, exact=True),  # SDPA logsumexp
        Saved(c.ATTN_VALUE, tokens * kv // tp, 2),  # SDPA v
        Saved(c.ATTN_VALUE, tokens * h // tp, 2),  # SDPA output = output-projection input
        Saved(c.MLP_NORM_INPUT, tokens * h, 4),
        Saved(c.MLP_NORM_INPUT, tokens, 4, exact=True),
        Saved(c.MLP_NORM_INPUT, tokens * h, 2, recomputable=True),
        Saved(c.MLP_UP_INPUT, tokens * h, 2, recomputable=True),
        Saved(c.MLP_ACT, tokens * f // tp, 2),  # activation-function input (gate output)
        Saved(c.MLP_ACT, tokens * f // tp, 2, recomputable=True),  # activation output
        Saved(c.MLP_ACT, tokens * f // tp, 2),  # up output
        Saved(c.DOWN_PROJ_INPUT, tokens * f // tp, 2, recomputable=True),  # gating product
    ]


def rotary_saved_tensors(d: ModelDims, seq_len: int) -> list[Saved]:
    """The rotary cos/sin tables: one pair per forward, shared by every block and the batch."""
    return [Saved(LayerClass.ATTN_CORE, seq_len * d.head_dim, 2) for _ in range(2)]


def head_saved_tensors(d: ModelDims, tokens: int, tp: int = 1) -> list[Saved]:
    """What the final norm, LM head and loss save (last pipeline stage)."""
    e = LayerClass.EMBEDDING
    return [
        Saved(e, tokens * d.hidden, 4),
        Saved(e, tokens, 4, exact=True),
        Saved(e, tokens * d.hidden, 2, recomputable=True),
        Saved(e, tokens * d.hidden, 2, recomputable=True),  # LM head input
        Saved(e, tokens * d.vocab // tp, 4, min_bits=LOSS_HEAD_MIN_BITS),  # log-probabilities of the loss
    ]


def stored_bytes(t: Saved, bits: int, cfg: AgoqConfig) -> int:
    """Bytes agoq stores for ``t`` at ``bits`` (unquantized below ``min_numel`` or at 16 bits)."""
    act = cfg.activation
    if not cfg.activation_on:
        return t.numel * t.elem_bytes
    if t.recomputable and act.recompute:
        return 0
    bits = max(bits, t.min_bits)
    if bits >= 16 or t.exact or t.numel < act.min_numel:
        return t.numel * t.elem_bytes
    scale_bytes = 2 if act.scale_dtype == "bf16" else 4
    return quantized_bytes(t.numel, bits, act.group_size, scale_bytes)


def stage_saved_tensors(d: ModelDims, par: Parallelism, stage: int, layers: int) -> list[Saved]:
    """Every tensor one micro-batch leaves saved on pipeline stage ``stage``."""
    tokens = par.micro_batch * par.seq_len
    saved = [t for _ in range(layers) for t in layer_saved_tensors(d, tokens, par.tp)]
    if layers:
        saved += rotary_saved_tensors(d, par.seq_len)
    if stage == par.pp - 1:
        saved += head_saved_tensors(d, tokens, par.tp)
    return saved


@dataclass
class StageMemory:
    """Per-GPU bytes of one pipeline stage."""

    stage: int
    """Pipeline stage index."""
    layers: int
    """Decoder blocks on this stage."""
    params: int
    """Parameters held by one GPU of this stage (after tensor parallelism)."""
    holds: int
    """Micro-batches of activations held at the peak."""
    weights: int
    """bf16 weights."""
    optimizer: int
    """fp32 master weights + Adam moments (ZeRO-partitioned)."""
    gradients: dict[str, int] = field(default_factory=dict)
    """Gradient accumulation storage: baseline and agoq."""
    activations: dict[str, int] = field(default_factory=dict)
    """Peak stored activations: baseline and agoq."""
    transient: dict[str, int] = field(default_factory=dict)
    """Unquantized working set beside the stored activations: agoq packs a layer's tensors as they are
    saved and unpacks or rebuilds them in backward, so one decoder block's (or the loss head's) saved
    tensors exist at full width at a time. Stock: 0 (its saved tensors are counted in full)."""
    reduction: dict[str, int] = field(default_factory=dict)
    """Temporaries of reducing one gradient bucket beyond the bucket itself (``reduction_working_set``):
    stock reduces in the bucket (0); agoq's 8-bit reduce-scatter holds one exchange round's and one
    store chunk's buffers. ZeRO-2/3 reduce while backward runs; ZeRO-1 at the accumulation boundary."""
    step_gradients: dict[str, int] = field(default_factory=dict)
    """Gradient bytes at the accumulation boundary (the activations are freed by then): agoq reduces
    its int8 state into an fp32 buffer the size of stock's (ZeRO-2/3: the partition; ZeRO-0/1: every
    gradient of the stage, as DeepSpeed's ``BF16_Optimizer`` all-reduces them) and holds both until
    the reduction is done; with optimizer offload it dequantizes on the host instead
    (``device_gradients``)."""
    host_weights: int = 0
    """Host bytes of the bf16 weight shards (ZeRO-3 ``offload_param``); ``weights`` is then 0."""
    host_optimizer: int = 0
    """Host bytes of the fp32 master weights + Adam moments (``offload_optimizer``); ``optimizer`` is
    then 0."""
    host_gradients: dict[str, int] = field(default_factory=dict)
    """Host gradient bytes, baseline and agoq (``host_memory``): DeepSpeed's fp32 gradient partition(s)
    the offloaded step reads, and for agoq also ``host_staging``."""
    host_staging: int = 0
    """Of agoq's host gradient bytes: the staging buffers its int8 partition crosses into once per step
    (codes + fp32 scales, ``gradient.offload.HostLink``)."""
    reduces_in_backward: bool = True
    """ZeRO-2/3 reduce gradient buckets while backward runs; ZeRO-0/1 at the accumulation boundary."""

    def backward(self, variant: str) -> int:
        """Beyond weights and optimizer states, what backward holds at its peak: gradients, stored
        activations, their working set and a bucket reduction in flight (ZeRO-2/3)."""
        reducing = self.reduction.get(variant, 0) if self.reduces_in_backward else 0
        return self.gradients[variant] + self.activations[variant] + self.transient[variant] + reducing

    def boundary(self, variant: str) -> int:
        """Beyond weights and optimizer states, what the accumulation boundary holds: the gradients
        there and, at ZeRO-0/1, a bucket reduction in flight."""
        reducing = 0 if self.reduces_in_backward else self.reduction.get(variant, 0)
        return self.step_gradients[variant] + reducing

    def peaks_at_boundary(self, variant: str) -> bool:
        """Whether the accumulation boundary, not backward, sets the peak."""
        return self.boundary(variant) > self.backward(variant)

    def total(self, variant: str) -> int:
        """Peak on one GPU of this stage for ``baseline`` or ``agoq``: the larger of backward's and the
        accumulation boundary's."""
        return self.weights + self.optimizer + max(self.backward(variant), self.boundary(variant))

    def host_total(self, variant: str) -> int:
        """Host memory of one rank of this stage for ``baseline`` or ``agoq`` (0 without offload)."""
        return self.host_weights + self.host_optimizer + self.host_gradients[variant]


def _layers_per_stage(layers: int, pp: int) -> list[int]:
    base, extra = divmod(layers, pp)
    return [base + (1 if s < extra else 0) for s in range(pp)]


def gradients_quantized(cfg: AgoqConfig) -> bool:
    """Whether ``cfg`` keeps gradients in int8 (otherwise they are fp32, as stock's)."""
    return cfg.gradient_store8


def gradient_bytes(numel: int, cfg: AgoqConfig) -> int:
    """agoq's gradient state for ``numel`` gradient elements (codes + scales + residual)."""
    grad = cfg.gradient
    if not gradients_quantized(cfg):
        return 4 * numel
    state = numel + 4 * math.ceil(numel / grad.group_size)
    return state * (2 if grad.error_feedback else 1)


def device_gradients(params: int, par: Parallelism, cfg: AgoqConfig) -> tuple[dict[str, int], dict[str, int]]:
    """Device gradient bytes of one rank holding ``params`` parameters: ``(backward, boundary)``, each
    for ``baseline`` and ``agoq`` (``StageMemory.gradients`` and ``step_gradients``).

    Stock DeepSpeed accumulates ``g`` elements in fp32 (``data_types.grad_accum_dtype: fp32``, the
    planner's convention): every gradient under ZeRO-0/1 (``BF16_Optimizer``; with offload the ZeRO-1
    optimizer's fp32 ``grad_accum`` of each parameter), the partition ``params / dp`` under ZeRO-2/3
    (ZeRO-2's compact partition buffer, ZeRO-3's ``grad_partitions_flat_buffer``):

    * stock: ``4 g`` in both phases. With ``offload_optimizer``: ZeRO-1 builds its fp32 partition at
      the boundary before copying it to the host (``+ 4 params / dp`` there); ZeRO-2 keeps its compact
      partition on the device across micro-batches, as without offload; ZeRO-3 allocates its partition
      on the host (``host_memory``), leaving 0 on the device.
    * agoq: the int8 state of the same ``g`` elements in backward (``gradient_bytes``). At the boundary
      without offload it is reduced or dequantized into an fp32 buffer as large as stock's (``+ 4 g``).
      With offload it crosses to the host in int8 and is dequantized there: nothing more on the device
      at ZeRO-2/3; at ZeRO-1 the int8 partition accumulator (``params / dp``) beside the boundary
      micro-batch's fp32 gradients (``4 g``). Without an 8-bit gradient path agoq holds what stock does.

    Not counted: the reduce buckets themselves (stock's and agoq's alike; agoq's temporaries beyond
    them are ``StageMemory.reduction``), ZeRO-3's gathered (in-flight) parameters and the step's
    per-sub-group fp32 copy of the partition; ZeRO-3 parameters below
    ``stage3_param_persistence_threshold`` (the norms) are counted as partitioned.
    """
    part = params // par.dp
    g = part if par.zero >= 2 else params
    offload = par.offload_optimizer != "none"
    stock_backward = 0 if offload and par.zero == 3 else 4 * g
    stock_boundary = stock_backward + (4 * part if offload and par.zero == 1 else 0)
    stock = ({"baseline": stock_backward}, {"baseline": stock_boundary})
    if not cfg.gradient_quantized:
        return {**stock[0], "agoq": stock_backward}, {**stock[1], "agoq": stock_boundary}
    state = gradient_bytes(g, cfg)
    int8 = gradients_quantized(cfg)
    if not offload:
        boundary = state + 4 * g if int8 else state
    elif par.zero == 1:
        boundary = state + (4 * g if int8 else 0) + gradient_bytes(part, cfg)
    else:
        boundary = state
    return {**stock[0], "agoq": state}, {**stock[1], "agoq": boundary}


def host_memory(params: int, par: Parallelism, cfg: AgoqConfig) -> tuple[int, int, dict[str, int], int]:
    """Host bytes of one rank holding ``params`` parameters: ``(weights, optimizer, gradients,
    staging)``, ``gradients`` for ``baseline`` and ``agoq`` (``StageMemory.host_*``). With ``n =
    params / dp`` the rank's partition:

    * ``offload_param`` (ZeRO-3): the bf16 weight shards, ``2 n`` (``ds_tensor`` on the host).
    * ``offload_optimizer``: the fp32 master weights and Adam moments, ``12 n``; the fp32 gradient the
      host optimizer reads, ``4 n`` (ZeRO-1/2: ``single_partition_of_fp32_groups[i].grad``; ZeRO-3:
      ``fp32_partitioned_groups_flat[i].grad``), and at ZeRO-3 also the fp32 partition the
      micro-batches accumulate into or are dequantized into, ``4 n`` (stock: the host
      ``grad_partitions_flat_buffer``; agoq: ``_agoq_host_flat``, which replaces it).
    * agoq's staging, with int8 gradient storage: the partition's codes and scales,
      ``n + 4 ceil(n / group_size)`` (``HostLink.state_bytes``).

    With ``grad_accum_dtype`` left at bf16, stock ZeRO-2 offload accumulates micro-batches on the host
    instead (``accumulated_grads_in_cpu``: whole owned parameters in bf16, about ``2 n`` more) and
    holds no device partition; the planner keeps its fp32-accumulation convention.
    """
    n = params // par.dp
    weights = 2 * n if par.offload_param != "none" else 0
    if par.offload_optimizer == "none":
        return weights, 0, {"baseline": 0, "agoq": 0}, 0
    fp32 = 4 * n * (2 if par.zero == 3 else 1)
    staging = n + 4 * math.ceil(n / cfg.gradient.group_size) if gradients_quantized(cfg) else 0
    return weights, 12 * n, {"baseline": fp32, "agoq": fp32 + staging}, staging


REDUCTION_CHUNK_BYTES = 20
"""Bytes per element of one exchange round or store chunk that a bucket reduction holds at most beside
the fp32 share: the store's requantize with error feedback keeps up to five fp32 temporaries of a chunk
(addend, dequantized value, difference, its finite copy, the new residual), more than a round's packed
send and receive buffers (``1 + 4 / group_size`` bytes per element and peer). Checked against live
bytes on CPU (``tests/gradient/test_bucket_copy.py``)."""


def reduction_working_set(bucket: int, share: int, world: int, cfg: AgoqConfig) -> int:
    """agoq's temporaries while one bucket of ``bucket`` elements is reduced, of which this rank owns
    ``share``, over ``world`` ranks: the fp32 sum of one round of the share (ZeRO-1/2/3 store the
    share round by round: ``4 min(share, ROUND_ELEMENTS)``; on one rank the store reads the bucket) plus
    ``REDUCTION_CHUNK_BYTES`` per element of one exchange round / store chunk
    (``collectives.ROUND_ELEMENTS``, ``accumulator.SPAN_CHUNK``). 0 without the 8-bit path."""
    if not cfg.gradient_quantized or bucket == 0:
        return 0
    from .gradient.accumulator import SPAN_CHUNK
    from .gradient.collectives import ROUND_ELEMENTS

    chunk = min(bucket, max(ROUND_ELEMENTS, SPAN_CHUNK))
    return (4 * min(share, ROUND_ELEMENTS) if world > 1 else 0) + REDUCTION_CHUNK_BYTES * chunk


def _largest_bucket_share(dims: ModelDims, par: Parallelism, params: int) -> tuple[int, int]:
    """``(bucket, share)``: the largest bucket DeepSpeed fills on a rank holding ``params`` parameters
    (``reduce_bucket_size``, or a single larger parameter, the embedding, which gets a bucket of its
    own) and the most of it one rank can own (ZeRO-1/2/3 partitions are contiguous: all of it, up to
    one partition)."""
    bucket = min(max(par.reduce_bucket_size, dims.vocab * dims.hidden // par.tp), params)
    return bucket, min(bucket, -(-params // par.dp))


def working_set(dims: ModelDims, par: Parallelism, stage: int, layers: int, cfg: AgoqConfig) -> int:
    """What agoq holds unquantized beside its stored activations at the peak: the saved tensors of
    the largest unit in flight (a decoder block, or the loss head on the last stage) at full width
    (``StageMemory.transient``); 0 when activations are not quantized."""
    if not cfg.activation_on:
        return 0
    tokens = par.micro_batch * par.seq_len
    units = [layer_saved_tensors(dims, tokens, par.tp)] if layers else []
    if stage == par.pp - 1:
        units.append(head_saved_tensors(dims, tokens, par.tp))
    return max((sum(t.numel * t.elem_bytes for t in unit) for unit in units), default=0)


def plan(dims: ModelDims, par: Parallelism, cfg: AgoqConfig | None = None) -> list[StageMemory]:
    """Per-stage memory of one rank, device and host, for stock training and agoq (``cfg`` defaults to
    agoq's defaults). Device: bf16 weights ``2 P`` (ZeRO-3: ``2 P / dp``; 0 with ``offload_param``),
    optimizer state ``12 P`` (ZeRO >= 1: ``/ dp``; 0 with ``offload_optimizer``), gradients
    (``device_gradients``) and activations; host: ``host_memory``."""
    cfg = cfg or AgoqConfig()
    table = cfg.activation.class_table()
    stages = []
    for s, n_layers in enumerate(_layers_per_stage(dims.layers, par.pp)):
        params = n_layers * dims.layer_params() // par.tp
        saved = stage_saved_tensors(dims, par, s, n_layers)
        if s == 0:
            params += dims.vocab * dims.hidden // par.tp
        if s == par.pp - 1:
            params += dims.hidden + (0 if dims.tied_embeddings else dims.vocab * dims.hidden // par.tp)
        holds = pipeline_holds(s, par.pp, par.micro_batches)
        host_weights, host_optimizer, host_gradients, staging = host_memory(params, par, cfg)
        stage = StageMemory(
            stage=s,
            layers=n_layers,
            params=params,
            holds=holds,
            weights=0 if par.offload_param != "none" else 2 * params // (par.dp if par.zero == 3 else 1),
            optimizer=0 if par.offload_optimizer != "none" else 12 * params // (par.dp if par.zero >= 1 else 1),
            host_weights=host_weights,
            host_optimizer=host_optimizer,
            host_gradients=host_gradients,
            host_staging=staging,
        )
        stage.gradients, stage.step_gradients = device_gradients(params, par, cfg)
        stage.activations = {
            "baseline": holds * sum(t.numel * t.elem_bytes for t in saved),
            "agoq": holds * sum(stored_bytes(t, table[str(t.cls.value)], cfg) for t in saved),
        }
        stage.transient = {"baseline": 0, "agoq": working_set(dims, par, s, n_layers, cfg)}
        stage.reduces_in_backward = par.zero >= 2
        if par.zero >= 1:
            bucket, share = _largest_bucket_share(dims, par, params)
            working = reduction_working_set(bucket, share, par.dp, cfg)
            stage.reduction = {"baseline": 0, "agoq": working}
        else:  # ZeRO-0 all-reduces in chunks of ``allreduce.CHUNK_ELEMENTS`` (not counted)
            stage.reduction = {"baseline": 0, "agoq": 0}
        stages.append(stage)
    return stages


GIB = 2**30


VARIANTS = ("baseline", "agoq")
"""The two trainings every figure is given for: stock DeepSpeed and agoq."""


def _offload_label(par: Parallelism) -> str:
    """The header's note of what is offloaded (empty without offload)."""
    parts = [
        f"{what} offload {device}"
        for what, device in (("optimizer", par.offload_optimizer), ("param", par.offload_param))
        if device != "none"
    ]
    return f" | {', '.join(parts)}" if parts else ""


def format_plan(dims: ModelDims, par: Parallelism, stages: list[StageMemory]) -> str:
    """A table (GiB per rank) of every stage, stock versus agoq; with offload, host columns too."""
    head = (
        f"{dims.name}: {dims.params() / 1e9:.2f}B params | seq {par.seq_len}, micro-batch {par.micro_batch}, "
        f"{par.micro_batches} micro-batches | TP{par.tp} PP{par.pp} DP{par.dp} ZeRO-{par.zero}{_offload_label(par)}"
    )
    cols = f"{'stage':>5} {'layers':>6} {'held':>4} {'weights':>8} {'optim':>8} {'grad':>15} {'activations':>17}"
    cols += f" {'working':>7} {'reduce':>7} {'peak':>17} {'saved':>6}"
    if par.offloads:
        cols += f" {'host':>17}"
    lines = [head, cols]
    for st in stages:
        g, a = st.gradients, st.activations
        tb, ta = st.total("baseline"), st.total("agoq")
        line = (
            f"{st.stage:>5} {st.layers:>6} {st.holds:>4} {st.weights / GIB:>8.2f} {st.optimizer / GIB:>8.2f} "
            f"{g['baseline'] / GIB:>6.2f}->{g['agoq'] / GIB:<6.2f} {a['baseline'] / GIB:>7.2f}->{a['agoq'] / GIB:<7.2f}"
            f" {st.transient['agoq'] / GIB:>7.2f} {st.reduction['agoq'] / GIB:>7.2f}"
            f" {tb / GIB:>7.2f}->{ta / GIB:<7.2f} {1 - ta / tb if tb else 0:>6.1%}"
        )
        if par.offloads:
            line += f" {st.host_total('baseline') / GIB:>7.2f}->{st.host_total('agoq') / GIB:<7.2f}"
        lines.append(line)
    worst_b = max(st.total("baseline") for st in stages)
    worst_a = max(st.total("agoq") for st in stages)
    lines.append(
        f"peak GPU: {worst_b / GIB:.2f} GiB stock -> {worst_a / GIB:.2f} GiB agoq ({1 - worst_a / worst_b:.1%} less)"
    )
    if par.offloads:
        host_b = max(st.host_total("baseline") for st in stages)
        host_a = max(st.host_total("agoq") for st in stages)
        lines.append(
            f"host per rank: {host_b / GIB:.2f} GiB stock -> {host_a / GIB:.2f} GiB agoq "
            f"(agoq's int8 staging: {max(st.host_staging for st in stages) / GIB:.2f} GiB)"
        )
    return "\n".join(lines)


def plan_json(dims: ModelDims, par: Parallelism, stages: list[StageMemory]) -> dict[str, Any]:
    """The plan as plain data: the model, the layout and every stage's fields, with its device peak
    (``total``) and host total (``host_total``) per variant."""
    return {
        "model": asdict(dims),
        "parallelism": asdict(par),
        "stages": [
            {
                **asdict(st),
                "device_peak": {v: st.total(v) for v in VARIANTS},
                "host_total": {v: st.host_total(v) for v in VARIANTS},
            }
            for st in stages
        ],
    }


LABELS = {
    "transient": "agoq working set",
    "step_gradients": "gradients at the boundary (int8 + fp32)",
    "reduction": "bucket reduction temporaries",
}
"""Chart legend names of ``StageMemory`` fields that differ from the field name."""


def plot(stages: list[StageMemory], path: Path, title: str) -> None:
    """Stacked bars per stage: stock and agoq side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(stages)), 4))
    colors = {
        "weights": "tab:gray",
        "optimizer": "tab:purple",
        "gradients": "tab:orange",
        "activations": "tab:blue",
        "transient": "tab:cyan",
        "step_gradients": "tab:red",
        "reduction": "tab:pink",
    }
    labelled: set[str] = set()
    for i, st in enumerate(stages):
        for j, variant in enumerate(("baseline", "agoq")):
            bottom = 0.0
            # The bar shows the phase that sets the peak: backward, or the accumulation boundary.
            at_boundary = st.peaks_at_boundary(variant)
            phase = ("step_gradients",) if at_boundary else ("gradients", "activations", "transient")
            reducing = ("reduction",) if at_boundary != st.reduces_in_backward else ()
            parts = ("weights", "optimizer", *phase, *reducing)
            for part in parts:
                color = colors[part]
                value = getattr(st, part)
                value = value[variant] if isinstance(value, dict) else value
                ax.bar(
                    i + 0.4 * j,
                    value / GIB,
                    0.38,
                    bottom=bottom,
                    color=color,
                    alpha=1.0 if j else 0.55,
                    label=None if part in labelled else LABELS.get(part, part),
                )
                labelled.add(part)
                bottom += value / GIB
    ax.set_xticks([i + 0.2 for i in range(len(stages))], [f"stage {st.stage}\nstock | agoq" for st in stages])
    ax.set_ylabel("GiB per GPU")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _run(args: argparse.Namespace) -> int:
    dims = NAMED_MODELS[args.model] if args.model in NAMED_MODELS else dims_from_hf_config(args.model)
    try:
        par = Parallelism(
            seq_len=args.seq_len,
            micro_batch=args.micro_batch,
            micro_batches=args.micro_batches,
            tp=args.tp,
            pp=args.pp,
            dp=args.dp,
            zero=args.zero,
            offload_optimizer=args.offload_optimizer,
            offload_param=args.offload_param,
            reduce_bucket_size=args.reduce_bucket_size,
        )
    except ValueError as exc:
        args.parser.error(str(exc))
    block: Any = {}
    if args.ds_config:
        block = json.loads(Path(args.ds_config).read_text()).get("agoq", {})
    stages = plan(dims, par, parse_agoq_config(block))
    print(format_plan(dims, par, stages))
    if args.json:
        Path(args.json).write_text(json.dumps(plan_json(dims, par, stages), indent=1))
    if args.chart:
        plot(stages, Path(args.chart), dims.name)
    return 0


def add_plan_command(sub: Any) -> None:
    """Register ``agoq-ds plan`` on the CLI's sub-parsers."""
    p = sub.add_parser("plan", help="per-rank GPU and host memory, stock vs agoq (LLaMA sizes or an HF config.json)")
    p.add_argument("--model", default="llama-8b", help=f"{', '.join(NAMED_MODELS)} or a path to config.json")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--micro-batches", type=int, default=8, help="gradient accumulation steps (M)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=1)
    p.add_argument(
        "--offload-optimizer",
        choices=OFFLOAD_DEVICES,
        default="none",
        help="ZeRO-Offload: optimizer state and fp32 gradient partition in host memory (ZeRO 1-3)",
    )
    p.add_argument(
        "--offload-param",
        choices=OFFLOAD_DEVICES,
        default="none",
        help="bf16 weight shards in host memory (ZeRO-3 only)",
    )
    p.add_argument(
        "--reduce-bucket-size",
        type=int,
        default=500_000_000,
        help="zero_optimization.reduce_bucket_size in elements (DeepSpeed's default 5e8)",
    )
    p.add_argument("--ds-config", help="take the agoq block from this ds_config.json (default: agoq defaults)")
    p.add_argument("--json", help="write the plan as JSON")
    p.add_argument("--chart", help="write a PNG bar chart")
    p.set_defaults(func=_run, parser=p)
