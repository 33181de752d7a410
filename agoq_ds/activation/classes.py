"""The layer classes of a decoder block that the activation bit policy speaks about."""

from __future__ import annotations

from enum import Enum


class LayerClass(str, Enum):
    """Where in a decoder block a saved tensor comes from; each class has its own default bit-width."""

    ATTN_NORM_INPUT = "attn_norm_input"
    """Tensors saved by the norm in front of attention (its input, normalised value)."""
    QKV_INPUT = "qkv_input"
    """Input of the query/key/value projections."""
    ATTN_CORE = "attn_core"
    """Tensors saved inside attention itself: rotary embedding, SDPA's q/k/v/out/logsumexp, eager
    attention probabilities. The softmax makes these the sensitive ones."""
    OUT_PROJ_INPUT = "out_proj_input"
    """Input of the attention output projection."""
    MLP_NORM_INPUT = "mlp_norm_input"
    """Tensors saved by the norm in front of the MLP."""
    MLP_UP_INPUT = "mlp_up_input"
    """Input of the gate/up projections."""
    MLP_ACT = "mlp_act"
    """Tensors saved by the MLP's activation function and gating product."""
    DOWN_PROJ_INPUT = "down_proj_input"
    """Input of the down projection."""
    EMBEDDING = "embedding"
    """Embeddings, final norm and LM head (outside the decoder blocks)."""
    OTHER = "other"
    """Anything an unknown architecture saves that no rule above recognises."""


DEFAULT_CLASS_BITS: dict[str, int] = {
    LayerClass.ATTN_CORE.value: 8,
    LayerClass.EMBEDDING.value: 8,
    LayerClass.OTHER.value: 8,
}
"""AGoQ's exceptions to ``default_bits`` (4): the attention-sensitive tensors, the embeddings/head,
and whatever an unknown architecture saves stay at 8 bits."""


def resolve_class_bits(default_bits: int, class_bits: dict[str, int]) -> dict[str, int]:
    """The full class -> bits table: ``default_bits`` for every class, then ``class_bits`` on top."""
    table = {c.value: default_bits for c in LayerClass}
    table.update({LayerClass(k).value: v for k, v in class_bits.items()})
    return table
