"""Which layer class the tensors saved in each module's own scope belong to.

Decided from structure seen in a traced forward (``trace.py``), not from attribute names, so LLaMA,
Mistral, Qwen2 and other decoder models classify the same way:

* **attention module**: the nearest module, at or above the scope where the attention kernel runs
  (``scaled_dot_product_attention``, or a softmax over a >= 4-D score tensor), that owns Linear
  layers. Tensors saved in its own scope or in its parameter-free/norm children are ``attn_core``
  (SDPA's v and output are told apart per call: ``attn_value``). Its Linear layers that read the
  attention module's input are ``qkv_input``, the others ``out_proj_input``.
* **MLP**: the innermost module that owns >= 2 Linear layers and an elementwise activation (a
  parameter-free child module or an activation function called in it) and neither is nor contains
  nor sits inside an attention module. Its own scope and parameter-free children are ``mlp_act``;
  its Linear layers that read the MLP's input are ``mlp_up_input``, the others ``down_proj_input``.
* **norm** (``nn.LayerNorm``/``nn.RMSNorm``/..., or a leaf module whose parameters are all 1-D):
  classified by what consumes its output: attention -> ``attn_norm_input``, MLP ->
  ``mlp_norm_input``.
* **blocks** are the numbered children of a container (``model.layers.3``, a ``PipelineModule``
  layer) that hold an attention module or MLP. Everything outside them (embeddings, final norm, LM
  head, loss) is ``embedding``.
* Anything else is ``other``; so is every tensor of an architecture where neither attention nor MLP
  is found (the documented fallback).

Name heuristics are only the fallback: when no attention kernel was seen (e.g. a custom fused
kernel), modules named like ``attn``/``attention`` that own Linear layers count as attention, and
likewise ``mlp``/``ffn``/``feed_forward`` for the MLP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .classes import LayerClass
from .trace import ACTIVATION, ATTENTION, Trace

_NORM_TYPES = tuple(
    t
    for t in (
        nn.LayerNorm,
        getattr(nn, "RMSNorm", None),
        nn.GroupNorm,
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.InstanceNorm1d,
        nn.InstanceNorm2d,
        nn.LocalResponseNorm,
    )
    if t is not None
)
_ATTN_NAME = re.compile(r"attn|attention", re.IGNORECASE)
_MLP_NAME = re.compile(r"mlp|ffn|feed_?forward", re.IGNORECASE)

LINEAR, EMBEDDING, NORM, PARAMLESS, CONTAINER, LEAF = "linear", "embedding", "norm", "paramless", "container", "leaf"


def module_kind(m: nn.Module) -> str:
    """Structural kind of a module: linear, embedding, norm, paramless (leaf without parameters,
    e.g. an activation), container (has children) or leaf (any other leaf)."""
    if isinstance(m, nn.Embedding | nn.EmbeddingBag):
        return EMBEDDING
    if isinstance(m, nn.Linear):
        return LINEAR
    if isinstance(m, _NORM_TYPES):
        return NORM
    if next(m.children(), None) is not None:
        return CONTAINER
    params = list(m.parameters(recurse=False))
    if not params:
        return PARAMLESS
    weight = getattr(m, "weight", None)
    if isinstance(weight, nn.Parameter) and weight.dim() == 2:
        return LINEAR  # e.g. HF's Conv1D, quantized Linear variants
    if all(p.dim() <= 1 for p in params) or "norm" in type(m).__name__.lower():
        return NORM
    return LEAF


@dataclass
class Structure:
    """The classification of one model: a class per module scope, plus what was recognised."""

    classes: dict[int, str]
    """Module index -> class of tensors saved in that module's own scope."""
    attention: set[int] = field(default_factory=set)
    """Indices of attention modules."""
    mlp: set[int] = field(default_factory=set)
    """Indices of MLP modules."""
    blocks: set[int] = field(default_factory=set)
    """Indices of decoder blocks."""

    def class_of(self, module: int) -> str:
        """Class of ``module``'s own scope (``other`` for a module never classified)."""
        return self.classes.get(module, LayerClass.OTHER.value)


class Classifier:
    """Classifies the modules of one model from traces of its forward passes."""

    def __init__(self, model: nn.Module) -> None:
        named = list(model.named_modules())
        self.names: list[str] = [n for n, _ in named]
        """Module names (``""`` for the root)."""
        self.index: dict[int, int] = {id(m): i for i, (_, m) in enumerate(named)}
        """``id(module)`` -> index."""
        self.kinds: list[str] = [module_kind(m) for _, m in named]
        """Structural kind of each module."""
        self.types: list[str] = [type(m).__name__ for _, m in named]
        by_name = {n: i for i, n in enumerate(self.names)}
        self.parent: list[int] = [by_name.get(n.rpartition(".")[0], -1) if n else -1 for n in self.names]
        """Index of each module's parent (-1 for the root)."""
        self._linear_desc = [0] * len(named)
        for i, kind in enumerate(self.kinds):
            if kind == LINEAR:
                for a in self.ancestors(i):
                    self._linear_desc[a] += 1

    def ancestors(self, i: int) -> list[int]:
        """Strict ancestors of module ``i``, nearest first."""
        out = []
        p = self.parent[i]
        while p >= 0:
            out.append(p)
            p = self.parent[p]
        return out

    def layer_of(self, i: int) -> str:
        """Name of the numbered layer (``model.layers.3``) module ``i`` is in, ``""`` if none."""
        parts = self.names[i].split(".") if self.names[i] else []
        for j, part in enumerate(parts):
            if part.isdigit():
                return ".".join(parts[: j + 1])
        return ""

    def classify(self, trace: Trace) -> Structure:
        """Classify every module from the calls in ``trace`` (see the module docstring)."""
        calls_of: dict[int, list[int]] = {}
        for ci, call in enumerate(trace.calls):
            calls_of.setdefault(call.module, []).append(ci)
        ops = {m: set().union(*(trace.calls[c].ops for c in cs)) for m, cs in calls_of.items()}

        attention = self._attention_modules(ops)
        mlp = self._mlp_modules(ops, calls_of, attention)
        blocks = self._blocks(attention | mlp)
        recognised = bool(attention or mlp)
        in_block = self._in_block(blocks, recognised)

        classes: dict[int, str] = {}
        for i in range(len(self.names)):
            classes[i] = self._class_of(i, trace, calls_of, ops, attention, mlp, in_block, recognised).value
        return Structure(classes, attention, mlp, blocks)

    # --- recognising attention, MLP, blocks ------------------------------------------------------

    def _attention_modules(self, ops: dict[int, set[str]]) -> set[int]:
        found = set()
        for m, kinds in ops.items():
            if ATTENTION in kinds:
                owner = next((a for a in [m, *self.ancestors(m)] if self._linear_desc[a] > 0), m)
                found.add(owner)
        if not found:
            found = self._by_name(_ATTN_NAME, min_linear=1)
        return found

    def _mlp_modules(self, ops: dict[int, set[str]], calls_of: dict[int, list[int]], attention: set[int]) -> set[int]:
        has_act = [False] * len(self.names)
        for m, kinds in ops.items():
            if ACTIVATION in kinds or self.kinds[m] == PARAMLESS:
                for a in [m, *self.ancestors(m)]:
                    has_act[a] = True
        under_attention = {i for i in range(len(self.names)) if any(a in attention for a in self.ancestors(i))}
        contains_attention = {a for m in attention for a in self.ancestors(m)}
        candidates = {
            i
            for i in calls_of
            if self.kinds[i] == CONTAINER
            and self._linear_desc[i] >= 2
            and has_act[i]
            and i not in attention
            and i not in under_attention
            and i not in contains_attention
        }
        if not candidates:
            candidates = {
                i
                for i in self._by_name(_MLP_NAME, min_linear=1)
                if i not in attention and i not in under_attention and i not in contains_attention
            }
        # Innermost wins: a module holding MLPs (a block of MLP blocks, an MoE layer) is not one.
        return candidates - {a for j in candidates for a in self.ancestors(j)}

    def _by_name(self, pattern: re.Pattern, min_linear: int) -> set[int]:
        hits = {
            i
            for i, name in enumerate(self.names)
            if self.kinds[i] == CONTAINER
            and self._linear_desc[i] >= min_linear
            and (pattern.search(name.rpartition(".")[2]) or pattern.search(self.types[i]))
        }
        return {i for i in hits if not any(a in hits for a in self.ancestors(i))}

    def _blocks(self, recognised: set[int]) -> set[int]:
        by_name = {n: i for i, n in enumerate(self.names)}
        blocks = set()
        for m in recognised:
            layer = self.layer_of(m)
            if layer:
                blocks.add(by_name[layer])
        return blocks

    def _in_block(self, blocks: set[int], recognised: bool) -> list[bool]:
        if not blocks:
            # No numbered layers: the whole model is one block if attention/MLP exist.
            return [recognised] * len(self.names)
        return [i in blocks or any(a in blocks for a in self.ancestors(i)) for i in range(len(self.names))]

    # --- per-module class --------------------------------------------------------------------------

    def _class_of(
        self,
        i: int,
        trace: Trace,
        calls_of: dict[int, list[int]],
        ops: dict[int, set[str]],
        attention: set[int],
        mlp: set[int],
        in_block: list[bool],
        recognised: bool,
    ) -> LayerClass:
        kind = self.kinds[i]
        if i in attention or ATTENTION in ops.get(i, ()):
            return LayerClass.ATTN_CORE
        owner = next((a for a in self.ancestors(i) if a in attention or a in mlp), None)
        if owner is not None and owner in attention:
            if kind == LINEAR:
                reads = self._reads_input_of(i, owner, trace, calls_of)
                if reads is None:
                    return LayerClass.ATTN_CORE
                return LayerClass.QKV_INPUT if reads else LayerClass.OUT_PROJ_INPUT
            return LayerClass.ATTN_CORE
        if i in mlp:
            return LayerClass.MLP_ACT
        if owner is not None:
            if kind == LINEAR:
                reads = self._reads_input_of(i, owner, trace, calls_of)
                if reads is None:
                    return LayerClass.OTHER
                return LayerClass.MLP_UP_INPUT if reads else LayerClass.DOWN_PROJ_INPUT
            return LayerClass.MLP_ACT if kind == PARAMLESS else LayerClass.OTHER
        if kind == EMBEDDING:
            return LayerClass.EMBEDDING
        if kind == NORM:
            consumer = self._consumer_class(i, trace, calls_of, attention, mlp)
            if consumer is not None:
                return consumer
        if recognised and not in_block[i]:
            return LayerClass.EMBEDDING
        return LayerClass.OTHER

    def _reads_input_of(self, i: int, owner: int, trace: Trace, calls_of: dict[int, list[int]]) -> bool | None:
        """Whether a call of module ``i`` got a tensor its enclosing ``owner`` call got (None: no call seen)."""
        seen = False
        for ci in calls_of.get(i, ()):
            seen = True
            p = trace.calls[ci].parent
            while p >= 0 and trace.calls[p].module != owner:
                p = trace.calls[p].parent
            if p >= 0 and trace.calls[ci].inputs & trace.calls[p].inputs:
                return True
        return False if seen else None

    def _consumer_class(
        self, i: int, trace: Trace, calls_of: dict[int, list[int]], attention: set[int], mlp: set[int]
    ) -> LayerClass | None:
        """Class implied by the modules that consume the output of norm ``i`` (None: none found)."""
        for ci in calls_of.get(i, ()):
            out = trace.calls[ci].outputs
            # Calls that start later cannot be ancestors of this one.
            consumers = [c for c in range(ci + 1, len(trace.calls)) if trace.calls[c].inputs & out]
            for c in consumers:
                m = trace.calls[c].module
                for role, cls in ((attention, LayerClass.ATTN_NORM_INPUT), (mlp, LayerClass.MLP_NORM_INPUT)):
                    if m in role or any(a in role for a in self.ancestors(m)):
                        return cls
        return None
