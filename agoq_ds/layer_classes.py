"""The layer classes of a decoder block that the activation bit policy speaks about, and their
default bits.

The ground floor: imports nothing of agoq's, so the config (``config.py``), the planner and the
activation quantizer (``activation/``, which re-exports these names from ``activation/classes.py``)
all build on it. How a saved tensor gets its class is decided in ``activation/classify.py`` from the
model's structure (module types, data flow, the attention kernel called), not from attribute names;
see that module.
"""

from __future__ import annotations

from enum import Enum


class LayerClass(str, Enum):
    """Where in a decoder block a saved tensor comes from; each class has its own default bit-width."""

    ATTN_NORM_INPUT = "attn_norm_input"
    """Tensors saved by the norm whose output feeds attention (its input and normalised value)."""
    QKV_INPUT = "qkv_input"
    """Input of the query/key/value projections (the Linear layers of attention that read the
    attention module's input)."""
    ATTN_CORE = "attn_core"
    """The attention-sensitive tensors: the query and key that the attention kernel (SDPA) saves to
    recompute the softmax, eager attention's probabilities, rotary tables, q/k norms and anything
    else saved directly inside the attention module. The softmax exponentiates errors in these."""
    ATTN_VALUE = "attn_value"
    """The value and the attention output saved by SDPA: backward uses them only linearly."""
    OUT_PROJ_INPUT = "out_proj_input"
    """Input of the attention output projection (the other Linear layers of attention)."""
    MLP_NORM_INPUT = "mlp_norm_input"
    """Tensors saved by the norm whose output feeds the MLP."""
    MLP_UP_INPUT = "mlp_up_input"
    """Input of the gate/up projections (the Linear layers of the MLP that read its input)."""
    MLP_ACT = "mlp_act"
    """Tensors saved by the MLP's activation function and gating product."""
    DOWN_PROJ_INPUT = "down_proj_input"
    """Input of the down projection (the other Linear layers of the MLP)."""
    EMBEDDING = "embedding"
    """Everything outside the decoder blocks: embeddings, final norm, LM head and loss."""
    CHECKPOINT_INPUT = "checkpoint_input"
    """Block inputs kept by activation checkpointing (the only tensors a checkpointed block stores)."""
    OTHER = "other"
    """Anything no rule above recognises, e.g. every tensor of an unknown architecture."""


DEFAULT_CLASS_BITS: dict[str, int] = {
    LayerClass.ATTN_NORM_INPUT.value: 8,
    LayerClass.ATTN_CORE.value: 8,
    LayerClass.ATTN_VALUE.value: 8,
    LayerClass.MLP_NORM_INPUT.value: 8,
    LayerClass.MLP_ACT.value: 8,
    LayerClass.EMBEDDING.value: 8,
    LayerClass.CHECKPOINT_INPUT.value: 8,
    LayerClass.OTHER.value: 8,
}
"""AGoQ's exceptions to ``default_bits`` (4). With ``recompute`` on (the default), every class left at
4 bits is rebuilt in backward from stored tensors (``recipe.py``): ``qkv_input`` and ``mlp_up_input``
(a norm's output) from the norm's stored input, ``down_proj_input`` (the gating product) from the
gate and up outputs, and ``out_proj_input`` is SDPA's output, stored once as ``attn_value``. So the
tensors actually stored are all 8-bit, at about 4.2 bits per saved element (10M and 76M LLaMA,
sequence 256; recomputed tensors count 0 bits), less than storing every tensor at 4 bits took:

* ``attn_norm_input`` / ``mlp_norm_input``: the residual stream, whose per-token outliers make 4-bit
  groups coarse; its 8-bit copy also rebuilds the norm output that q/k/v and gate/up read. With the
  norms at 4 bits the 10M model's held-out loss ended 4.9% above stock after 1000 steps (issue 13).
* ``mlp_act`` (gate and up outputs): they rebuild the down projection's input.
* ``attn_core`` (SDPA's q and k): backward recomputes ``exp(q k^T - lse)`` with the exact
  log-sum-exp, so score errors are exponentiated; q/k alone at 4 bits made the mean relative
  gradient error 2.2 (useless gradients), at 8 bits 0.025.
* ``attn_value`` (SDPA's v and output): ``dS = P * (dP - rowsum(dO * O))`` cancels, which
  amplifies their error into the q/k projection gradients; v alone at 4 bits: mean error 0.15,
  at 8 bits 0.006. (The output is the same memory as the o_proj input, stored once.)
* ``embedding`` (head and loss; log-probabilities are stored as probabilities) and
  ``checkpoint_input`` (a checkpointed block recomputes everything from it): 8 bits, small.
* ``other`` (unrecognised tensors): conservative.

Without recomputation the 4-bit classes are stored at 4 bits (about 6 bits per element on average).
"""


ATTENTION_CLASSES = (LayerClass.ATTN_CORE.value, LayerClass.ATTN_VALUE.value)
"""The classes whose errors the softmax backward amplifies (see ``DEFAULT_CLASS_BITS``)."""

ATTENTION_MIN_BITS = 8
"""Bits the attention classes keep under ``policy: uniform`` (unless ``class_bits`` names them)."""


LOSS_HEAD_MIN_BITS = 8
"""Floor for the log-probabilities a log-softmax/cross-entropy saves, under every policy and rule:
backward turns them into ``softmax - onehot`` over the whole vocabulary, the largest saved tensor of
the step and the one every gradient starts from; at 4 bits (``policy: uniform``) a 76M model's run
diverged on a GPU (issue 13). Stored as probabilities, rounded stochastically (see
``storage.SavedTensor._store_quantized``): rounded to nearest, the small probabilities of a peaked
row read back 0 and the loss no longer pushes those logits down. That bias alone cost the 10M model
4.6% of held-out loss after 1000 steps; with the head exact the same run ended 1.8% below stock."""


def resolve_class_bits(default_bits: int, class_bits: dict[str, int]) -> dict[str, int]:
    """The full class -> bits table: ``default_bits`` for every class, then ``class_bits`` on top."""
    table = {c.value: default_bits for c in LayerClass}
    table.update({LayerClass(k).value: v for k, v in class_bits.items()})
    return table
