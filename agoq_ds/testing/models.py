"""Small LLaMA-architecture HF models built from a config (no download), for examples and tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import VOCAB_SIZE


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a LLaMA-architecture model."""

    hidden: int = 256
    """Hidden size."""
    layers: int = 4
    """Decoder blocks."""
    heads: int = 8
    """Attention heads."""
    kv_heads: int = 4
    """Key/value heads (grouped-query attention when fewer than ``heads``)."""
    intermediate: int = 688
    """MLP width."""
    vocab: int = VOCAB_SIZE
    """Vocabulary size (byte-level by default)."""
    max_positions: int = 2048
    """Longest sequence."""


SHAPES: dict[str, LlamaShape] = {
    "tiny": LlamaShape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=344),
    "small": LlamaShape(),
    "10m": LlamaShape(hidden=384, layers=6, heads=6, kv_heads=2, intermediate=1024),
    "bench": LlamaShape(hidden=512, layers=4, heads=8, kv_heads=8, intermediate=1376),
    "76m": LlamaShape(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048),
}
"""Named shapes: ``tiny`` for tests, ``small`` for examples, ``10m`` (~10M parameters) for the
convergence benchmark, ``bench`` for activation-memory benchmarks, ``76m`` for the GPU convergence
run of issue 13."""


def llama_config(shape: LlamaShape | str = "small", **overrides):
    """A ``transformers.LlamaConfig`` for ``shape`` (SDPA attention, untied embeddings)."""
    from transformers import LlamaConfig

    s = SHAPES[shape] if isinstance(shape, str) else shape
    kwargs = dict(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=s.max_positions,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_llama(shape: LlamaShape | str = "small", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A freshly initialised ``LlamaForCausalLM`` (deterministic for ``seed``)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(shape, **overrides))
    return model.to(dtype)


class _EmbedPipe(torch.nn.Module):
    """Pipeline stage entry: token ids -> hidden states."""

    def __init__(self, embed_tokens: torch.nn.Embedding) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class _DecoderLayerPipe(torch.nn.Module):
    """One HF decoder layer taking and returning a single hidden-state tensor (causal, no cache)."""

    def __init__(self, layer: torch.nn.Module, rotary_emb: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.rotary_emb = rotary_emb

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        position_embeddings = self.rotary_emb(hidden, positions)
        return self.layer(hidden, position_ids=positions, position_embeddings=position_embeddings)


class _HeadPipe(torch.nn.Module):
    """Pipeline stage exit: final norm + LM head -> logits."""

    def __init__(self, norm: torch.nn.Module, lm_head: torch.nn.Linear) -> None:
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


def llama_pipeline_layers(model) -> list[torch.nn.Module]:
    """The layers of an HF ``LlamaForCausalLM`` (or Mistral/Qwen2) as a list for ``PipelineModule``."""
    inner = model.model
    import copy

    return [
        _EmbedPipe(inner.embed_tokens),
        *[_DecoderLayerPipe(layer, copy.deepcopy(inner.rotary_emb)) for layer in inner.layers],
        _HeadPipe(inner.norm, model.lm_head),
    ]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, as HF causal LMs compute it (labels = input ids)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1)
    )
