"""Layer classes come from structure: LLaMA, Mistral, Qwen2 and a renamed decoder classify alike;
eager attention, name fallback and an unknown architecture behave as documented."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from agoq_ds.activation import ActivationQuantizer
from agoq_ds.config import ActivationConfig

LLAMA_LAYER = {
    "input_layernorm": "attn_norm_input",
    "self_attn": "attn_core",
    "self_attn.q_proj": "qkv_input",
    "self_attn.k_proj": "qkv_input",
    "self_attn.v_proj": "qkv_input",
    "self_attn.o_proj": "out_proj_input",
    "post_attention_layernorm": "mlp_norm_input",
    "mlp": "mlp_act",
    "mlp.act_fn": "mlp_act",
    "mlp.gate_proj": "mlp_up_input",
    "mlp.up_proj": "mlp_up_input",
    "mlp.down_proj": "down_proj_input",
}
OUTSIDE = {"model.embed_tokens": "embedding", "model.norm": "embedding", "lm_head": "embedding"}
SMALL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _classify(model: nn.Module, *inputs, config: ActivationConfig | None = None, **kwargs) -> ActivationQuantizer:
    quantizer = ActivationQuantizer(model, config or ActivationConfig()).install()
    out = model(*inputs, **kwargs)
    loss = out.loss if hasattr(out, "loss") else out.float().square().mean()
    loss.backward()
    quantizer.on_step_end()
    quantizer.remove()
    return quantizer


def _hf(model_cls, config_cls, **extra):
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**SMALL, **extra}, attn_implementation=extra.pop("attn", "sdpa"))).train()
    ids = torch.randint(0, 256, (2, 32))
    return _classify(model, input_ids=ids, labels=ids)


def _layer_classes(q: ActivationQuantizer) -> dict[str, str]:
    prefix = "model.layers.0."
    return {k[len(prefix) :]: v for k, v in q.classes().items() if k.startswith(prefix)}


def test_llama_mistral_qwen2_classify_the_same_way():
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    for model_cls, config_cls in (
        (LlamaForCausalLM, LlamaConfig),
        (MistralForCausalLM, MistralConfig),
        (Qwen2ForCausalLM, Qwen2Config),
    ):
        q = _hf(model_cls, config_cls)
        layer = _layer_classes(q)
        assert {k: layer[k] for k in LLAMA_LAYER} == LLAMA_LAYER, model_cls.__name__
        assert {k: q.classes()[k] for k in OUTSIDE} == OUTSIDE, model_cls.__name__
        # SDPA's q/k/v/output were recognised as such.
        assert {"attn_core", "attn_value"} <= set(q._current().by_class), model_cls.__name__


def test_eager_attention_is_recognised_by_its_softmax():
    from transformers import LlamaConfig, LlamaForCausalLM

    q = _hf(LlamaForCausalLM, LlamaConfig, attn="eager")
    layer = _layer_classes(q)
    assert {k: layer[k] for k in LLAMA_LAYER} == LLAMA_LAYER
    # eager attention saves the probabilities: [batch, heads, seq, seq] under attn_core
    assert q._current().by_class["attn_core"].numel >= 2 * 4 * 32 * 32


class _Mixer(nn.Module):
    """Attention under unusual names, fused QKV, SDPA."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.wqkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.wqkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class _Ffw(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(d, 4 * d)
        self.w_out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(F.gelu(self.w_in(x)))


class _Cell(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.pre = nn.LayerNorm(d)
        self.mixer = _Mixer(d, 4)
        self.post = nn.LayerNorm(d)
        self.ffw = _Ffw(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.pre(x))
        return x + self.ffw(self.post(x))


class _Net(nn.Module):
    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(100, d)
        self.cells = nn.ModuleList([_Cell(d), _Cell(d)])
        self.out = nn.Linear(d, 100)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids)
        for cell in self.cells:
            x = cell(x)
        return F.cross_entropy(self.out(x).flatten(0, 1), ids.flatten())


def test_structure_not_names_decides():
    torch.manual_seed(0)
    q = _classify(_Net(), torch.randint(0, 100, (2, 64)))
    c = q.classes()
    assert c["cells.1.pre"] == "attn_norm_input" and c["cells.1.post"] == "mlp_norm_input"
    assert c["cells.1.mixer"] == "attn_core"
    assert c["cells.1.mixer.wqkv"] == "qkv_input" and c["cells.1.mixer.proj"] == "out_proj_input"
    assert c["cells.1.ffw"] == "mlp_act"  # GELU called as a function in the MLP's own scope
    assert c["cells.1.ffw.w_in"] == "mlp_up_input" and c["cells.1.ffw.w_out"] == "down_proj_input"
    assert c["tok"] == c["out"] == c["<root>"] == "embedding"
    by_class = q._current().by_class
    assert by_class["attn_value"].numel > 0 and by_class["attn_core"].numel > 0
    # the GELU output saved by w_out is recomputed from the stored GELU input
    assert by_class["down_proj_input"].derived_numel == 2 * (2 * 64 * 256)  # both cells


class _BmmAttention(nn.Module):
    """Attention by bmm and a 3-D softmax (no SDPA, no 4-D scores): found by its name."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 8, dim=-1)
        return self.o(w @ self.v(x))


def test_name_fallback_for_unrecognised_attention_kernels():
    model = nn.Sequential()
    model.add_module("attn", _BmmAttention(64))
    q = _classify(model, torch.randn(2, 16, 64, requires_grad=True))
    c = q.classes()
    assert c["attn.q"] == c["attn.k"] == c["attn.v"] == "qkv_input"
    assert c["attn.o"] == "out_proj_input" and c["attn"] == "attn_core"


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.rnn = nn.GRU(16, 16, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.bn(self.conv1(x))))
        seq, _ = self.rnn(h.flatten(2).transpose(1, 2))
        return self.head(seq[:, -1])


def test_unknown_architecture_falls_back_to_other():
    torch.manual_seed(0)
    model = _ConvNet()
    x = torch.randn(4, 3, 16, 16)
    ref = torch.autograd.grad(model(x).square().mean(), list(model.parameters()))
    q = ActivationQuantizer(model, ActivationConfig()).install()
    for _ in range(2):
        grads = torch.autograd.grad(model(x).square().mean(), list(model.parameters()))
        q.on_step_end()
    q.remove()
    assert set(q.classes().values()) == {"other"}
    assert set(q._current().by_class) == {"other"}
    assert q.table()["other"] == 8
    largest = max(float(r.norm()) for r in ref)
    for r, g in zip(ref, grads, strict=True):
        if r.norm() > 1e-4 * largest:  # conv1's bias feeds BatchNorm: its true gradient is 0
            assert torch.nn.functional.cosine_similarity(r.flatten(), g.flatten(), dim=0) > 0.999
