"""Saved tensors are really replaced by their quantized form: exact bytes, released originals,
deduplication, what is left alone, live bytes back to zero after backward."""

from __future__ import annotations

import gc
import weakref

import torch
from torch import nn

from agoq_ds.activation import ActivationQuantizer
from agoq_ds.activation.identity import SpanTable, Storages
from agoq_ds.activation.storage import Ledger, QuantSpec, SavedTensor
from agoq_ds.config import ActivationConfig
from agoq_ds.testing.models import build_llama
from tests.activation.act_helpers import text_batch


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.SiLU(), nn.Linear(512, 256))


def _quantized_bytes(numel: int, bits: int, group: int = 128) -> int:
    return numel * bits // 8 + -(-numel // group) * 2  # codes + bf16 scales


def test_stored_bytes_are_exactly_the_quantized_bytes_and_originals_are_freed():
    model = _mlp()
    quantizer = ActivationQuantizer(model, ActivationConfig(policy="uniform", default_bits=4)).install()
    x = torch.randn(64, 256)
    model(x).sum().backward()  # traced step
    quantizer.on_step_end()

    captured = {}
    handle = model[1].register_forward_hook(lambda m, a, out: captured.update(hidden=weakref.ref(a[0])))
    y = model(x)
    handle.remove()
    gc.collect()
    # The SiLU input (the first Linear's output) was only referenced by autograd: it is gone.
    assert captured["hidden"]() is None
    # Saved: the input x (by Linear 0) and the SiLU input at 4 bits; the SiLU output (saved by
    # Linear 1) is recomputed from the SiLU input in backward and stores nothing.
    expected = _quantized_bytes(64 * 256, 4) + _quantized_bytes(64 * 512, 4)
    ledger = quantizer.engine.ledger
    assert ledger.live_stored == expected
    assert ledger.live_baseline == 4 * (64 * 256 + 2 * 64 * 512)
    y.sum().backward()
    del y
    gc.collect()
    assert ledger.live_stored == 0 and ledger.live_tensors == 0
    assert quantizer.classes()["0"] == "mlp_up_input" and quantizer.classes()["2"] == "down_proj_input"
    quantizer.remove()


def test_without_quantizer_the_original_stays_alive():
    model = _mlp()
    captured = {}
    model[1].register_forward_hook(lambda m, a, out: captured.update(hidden=weakref.ref(a[0])))
    y = model(torch.randn(64, 256))
    gc.collect()
    assert captured["hidden"]() is not None
    del y


def test_llama_live_bytes_peak_and_return_to_zero():
    model = build_llama("tiny").train()
    ids = text_batch()
    quantizer = ActivationQuantizer(model, ActivationConfig()).install()
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        stored_after_forward = quantizer.engine.ledger.live_stored
        loss.backward()
        del loss
        gc.collect()
        assert quantizer.engine.ledger.live_stored == 0
        assert quantizer.engine.ledger.live_tensors == 0
        quantizer.on_step_end()
    stats = quantizer.stats()
    assert stats["stored_bytes_peak"] == stored_after_forward == stats["stored_bytes_per_forward"]
    assert stats["baseline_bytes_peak"] == stats["baseline_bytes_per_forward"]
    assert stats["compression"] > 5
    quantizer.remove()


def test_deduplication_of_views_and_shared_inputs():
    model = build_llama("tiny").train()
    ids = text_batch()
    quantizer = ActivationQuantizer(model, ActivationConfig()).install()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        quantizer.on_step_end()
    usage = quantizer._current().by_module
    for layer in (0, 1):
        # q/k/v projections save the same normed input: one tensor.
        qkv = [u for (m, c), u in usage.items() if c == "qkv_input" and m.startswith(f"model.layers.{layer}.")]
        assert sum(u.tensors for u in qkv) == 1
    # The o_proj input is a view of SDPA's output: stored once, under attn_value.
    assert "out_proj_input" not in quantizer._current().by_class
    assert quantizer._current().by_class["attn_value"].tensors == 4  # v and output, 2 layers
    quantizer.remove()


def test_span_key_views_versions_and_address_reuse():
    storages = Storages()
    key = storages.span_key
    t = torch.randn(32, 16)
    assert key(t) == key(t.t()) == key(t.view(16, 32))
    assert key(t) != key(t[:4]) != key(t[:, :4])
    before = key(t)
    t.add_(1)
    assert key(t) != before  # in-place change: new data, new key

    table, ledger = SpanTable(), Ledger()
    holder = SavedTensor(t, ledger, 0)
    table.put(key(t), holder)
    assert table.get(key(t)) is holder
    holder.finalize("other", "", [4], False, QuantSpec(), 0)  # quantized: the holder lets go of t
    old = key(t)
    del t
    gc.collect()
    later = torch.randn(32, 16)  # often at the freed address on CPU allocators; never the same storage
    assert key(later) != old and table.get(key(later)) is None
    del holder
    gc.collect()
    assert table.get(old) is None  # the table keeps no holder alive


def test_parameters_buffers_integers_and_small_tensors_left_alone():
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(100, 64)
            self.lin = nn.Linear(64, 64)
            self.register_buffer("scale", torch.full((64,), 2.0))

        def forward(self, ids):
            h = self.emb(ids)  # saves the integer ids
            small = h[:1] * self.lin.bias  # saves a small slice of h (and the bias: not counted)
            return self.lin(h * self.scale).sum() + small.sum()  # the mul saves only the buffer

    model = Tiny()
    quantizer = ActivationQuantizer(model, ActivationConfig(policy="uniform", default_bits=4, min_numel=1024)).install()
    ids = torch.randint(0, 100, (32, 8))
    for _ in range(2):
        model(ids).backward()
        quantizer.on_step_end()
    usage = quantizer._current().by_class
    total = sum(u.tensors for u in usage.values())
    quantized = sum(u.quantized_numel for u in usage.values())
    assert total == 3  # ids, the small slice, h * scale (by lin)
    assert quantized == 32 * 8 * 64  # only the large float tensor
    assert sum(u.baseline for u in usage.values()) == 32 * 8 * 8 + 8 * 64 * 4 + 32 * 8 * 64 * 4
    quantizer.remove()


class _Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2  # saves nothing for backward


def test_traced_forward_frees_what_stock_frees():
    """The first (traced) forward keys module inputs and outputs by storage, without holding them:
    a module output nothing saves is freed as soon as the forward is done with it, as without agoq."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), _Double(), nn.Linear(512, 256))
    quantizer = ActivationQuantizer(model, ActivationConfig(policy="uniform", default_bits=4)).install()
    first: dict = {}

    def later(*_: object) -> None:  # in the last Linear: the first one's output is no one's input now
        gc.collect()
        first["alive"] = first["out"]() is not None

    hooks = [
        model[0].register_forward_hook(lambda m, a, out: first.update(out=weakref.ref(out))),
        model[2].register_forward_hook(later),
    ]
    model(torch.randn(64, 256)).sum().backward()
    for h in hooks:
        h.remove()
    assert quantizer.engine.trace is not None and quantizer.engine.trace.calls  # that forward was traced
    assert first["alive"] is False, "the traced forward held a module output nothing saves"


def test_first_step_peaks_below_stock():
    """Forward and backward peaks of the traced first step and of a replayed step, against stock's
    (live storages counted by ``agoq_ds/testing/live_bytes.py``; parameters and their gradients aside)."""
    from agoq_ds.testing.live_bytes import measure_step

    ids = text_batch(batch=2, seq=128)
    peaks = {}
    for variant in ("stock", "agoq"):
        model = build_llama("small", dtype=torch.bfloat16, seed=0)
        quantizer = ActivationQuantizer(model, ActivationConfig()).install() if variant == "agoq" else None
        for step in range(3):  # agoq: traced, recorded, replayed
            peaks[variant, step] = measure_step(model, ids)["kept_peaks"]
            if quantizer is not None:
                quantizer.on_step_end()
        if quantizer is not None:
            assert quantizer.engine.replayed == 1
    for step in (0, 2):
        stock_forward, stock_backward = peaks["stock", step]
        agoq_forward, agoq_backward = peaks["agoq", step]
        assert agoq_forward < 0.7 * stock_forward, (step, agoq_forward, stock_forward)
        assert agoq_backward < 0.7 * stock_backward, (step, agoq_backward, stock_backward)
