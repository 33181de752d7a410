"""Run under ``TRITON_INTERPRET=1`` by ``test_fused_recipes.py``: the fused dequantize-and-rebuild
kernels on a real bf16 LLaMA backward, against the unfused recipes. Prints one JSON line."""

from __future__ import annotations

import gc
import json
import math

import torch

from agoq_ds.activation import ActivationQuantizer, fused_recipes, storage
from agoq_ds.activation.storage import DerivedTensor, SavedTensor
from agoq_ds.config import ActivationConfig
from agoq_ds.quant import dequantize
from agoq_ds.testing.models import build_llama

BF16_ULP = 2.0**-7
"""Relative spacing of bf16 values: the most one rounding of a last-bit difference (``exp``) moves."""


def _reference(view) -> torch.Tensor:
    """What ``view.unpack()`` gives, without touching the holder's read counts."""
    holder = view.holder
    if isinstance(holder, DerivedTensor):
        return holder.bound([_reference(v) for v in holder.sources]).as_strided(view.shape, view.stride)
    if holder.raw is not None:
        return holder.raw.as_strided(view.shape, view.stride)
    return dequantize(holder.q, flat=True).as_strided(view.shape, view.stride)


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def main() -> dict:
    torch.manual_seed(0)
    model = build_llama("tiny", seed=0, dtype=torch.bfloat16).train()
    quantizer = ActivationQuantizer(model, ActivationConfig()).install()
    ids = torch.randint(0, 200, (2, 32))
    for _ in range(2):  # traced, then recorded: the third forward replays its plan
        _step(model, ids)
        quantizer.on_step_end()

    # Fused: the recipes' references first (from the stored codes), then backward through rebuild.
    loss = model(input_ids=ids, labels=ids).loss
    derived = [o for o in gc.get_objects() if isinstance(o, DerivedTensor)]
    stored = [o for o in gc.get_objects() if isinstance(o, SavedTensor) and o.q is not None]
    references = {id(d): d.bound([_reference(v) for v in d.sources]) for d in derived}
    kinds = {id(d): (fused_recipes.match(d.bound) or ("none",))[0] for d in derived}
    results: dict[int, torch.Tensor] = {}
    real_rebuild = storage.rebuild

    def recording(d):
        out = real_rebuild(d)
        if out is not None:
            results[id(d)] = out.detach().clone()
        return out

    dequantized = [0]
    real_dequantize = storage.dequantize

    def counting(q, **kw):
        dequantized[0] += 1
        return real_dequantize(q, **kw)

    fused_reads = [0]
    real_read = fused_recipes._read

    def counting_reads(holder, value):
        fused_reads[0] += 1
        real_read(holder, value)

    storage.rebuild, storage.dequantize, fused_recipes._read = recording, counting, counting_reads
    model.zero_grad(set_to_none=True)
    loss.backward()
    fused_grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    # Producers rebuilt inside their consumer's kernel (h with y, s with p) are checked through _result.
    for d in derived:
        if id(d) not in results and d._result is not None and kinds[id(d)] in ("norm_h", "silu"):
            results[id(d)] = d._result.detach().clone()
    storage.rebuild, storage.dequantize, fused_recipes._read = real_rebuild, real_dequantize, real_read

    # Unfused: the same step with the recipes evaluated op by op (and the same rounding seeds).
    storage.rebuild = lambda d: None
    quantizer.engine.forwards -= 1
    unfused_grads = _step(model, ids)
    storage.rebuild = real_rebuild

    report = {"kinds": {}, "stored": len(stored), "dequantize_calls": dequantized[0], "fused_reads": fused_reads[0]}
    ok, details = True, []
    for d in derived:
        kind = kinds[id(d)]
        entry = report["kinds"].setdefault(kind, {"count": 0, "fused": 0, "max_ulps": 0.0})
        entry["count"] += 1
        if id(d) not in results:
            continue
        entry["fused"] += 1
        got, ref = results[id(d)].float(), references[id(d)].float()
        if got.shape != ref.shape or got.dtype != torch.float32:
            ok = False
            details.append(f"{kind}: shape {tuple(got.shape)} vs {tuple(ref.shape)}")
            continue
        ulps = ((got - ref).abs() / (ref.abs() * BF16_ULP).clamp_min(1e-30)).max().item()
        entry["max_ulps"] = max(entry["max_ulps"], ulps)
        exact = kind in ("norm_h", "norm_y")
        if (exact and not torch.equal(got, ref)) or (not exact and ulps > 1.0):
            ok = False
            details.append(f"{kind}: {ulps:.2f} bf16 ulps from the unfused recipe")
    worst = 0.0
    for name, g in unfused_grads.items():
        scale = g.abs().max().item() or 1.0
        worst = max(worst, (fused_grads[name] - g).abs().max().item() / scale)
    report["grad_max_rel_diff"] = worst
    report["ok"], report["detail"] = ok, "; ".join(details)
    return report


if __name__ == "__main__":
    out = main()
    print(json.dumps(out, default=lambda v: v if not isinstance(v, float) or math.isfinite(v) else str(v)))
