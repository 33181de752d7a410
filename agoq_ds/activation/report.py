"""Readable tables of what the activation quantizer stored: per layer class or per layer."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from .classes import LayerClass
from .storage import Usage


@dataclass
class Snapshot:
    """What one optimizer step stored (taken at ``on_step_end``), the input of the report."""

    step: int
    """Optimizer steps completed when taken."""
    forwards: int
    """Outermost forwards (micro-batches) in the step."""
    by_class: dict[str, Usage]
    """Usage per class, summed over the step's forwards."""
    by_module: dict[tuple[str, str], Usage]
    """Usage per (module, class), summed over the step's forwards."""
    peak_stored: int
    """Peak live stored bytes in the step."""
    peak_baseline: int
    """Peak live bytes the same tensors would have held unquantized."""
    peak_bf16: int
    """Peak live bytes the same tensors would have held in bf16."""
    calibration: bool = False
    """The step was a budget-mode calibration step (stored unquantized; ``bits`` are the result)."""


def total(usages: list[Usage]) -> Usage:
    """Sum of several usages."""
    out = Usage()
    for u in usages:
        out.merge(u)
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:10.3f}"


def _row(name: str, bits: str, u: Usage, per: int) -> str:
    bf16 = 2 * u.numel
    ratio = f"{u.stored / bf16:6.3f}x" if bf16 else "     -"
    comp = f"{u.baseline / u.stored:6.2f}x" if u.stored else "     -"
    return (
        f"{name:34s} {bits:>4s} {u.tensors // per:7d} {u.numel // per:12d} {_mib(u.stored / per)} "
        f"{_mib(bf16 / per)} {_mib(u.baseline / per)} {u.avg_bits:7.2f} {ratio} {comp}"
    )


HEADER = (
    f"{'':34s} {'bits':>4s} {'tensors':>7s} {'elements':>12s} {'stored MiB':>10s} {'bf16 MiB':>10s} "
    f"{'unquant MiB':>10s} {'avg bit':>7s} {'vs bf16':>7s} {'compr.':>7s}"
)


def render(
    snap: Snapshot,
    table: dict[str, int],
    *,
    title: str,
    per_layer: bool = False,
    layer_of=None,
    overrides: dict[tuple[str, str], int] | None = None,
) -> str:
    """The report text: per class (per micro-batch), totals, peaks, and optionally per layer.

    ``table`` is the class -> bits table shown in the ``bits`` column ("mix" where per-module
    overrides differ); ``layer_of(module name) -> layer name`` groups rows for ``per_layer``.
    """
    per = max(snap.forwards, 1)
    note = ", calibration step: stored unquantized, bits chosen after it" if snap.calibration else ""
    lines = [f"{title} (step {snap.step}, per micro-batch over {snap.forwards} forward(s){note})", HEADER]
    mixed = {cls for (_, cls) in (overrides or {})}
    for cls in [c.value for c in LayerClass]:
        u = snap.by_class.get(cls)
        if u is None or u.numel == 0:
            continue
        bits = "mix" if cls in mixed else str(table.get(cls, "-"))
        lines.append(_row(cls, bits, u, per))
    all_ = total(list(snap.by_class.values()))
    lines.append(_row("total", "", all_, per))
    if snap.peak_stored:
        lines.append(
            f"peak live: stored {snap.peak_stored / 2**20:.3f} MiB, unquantized {snap.peak_baseline / 2**20:.3f} MiB "
            f"({snap.peak_baseline / snap.peak_stored:.2f}x), bf16 {snap.peak_bf16 / 2**20:.3f} MiB "
            f"({snap.peak_stored / max(snap.peak_bf16, 1):.3f}x of bf16)"
        )
    if per_layer and layer_of is not None:
        by_layer: dict[str, list[Usage]] = defaultdict(list)
        for (module, _), u in snap.by_module.items():
            by_layer[layer_of(module) or "<outside layers>"].append(u)
        lines.append("")
        lines.append(HEADER.replace(" " * 34, f"{'layer':34s}", 1))
        for layer in sorted(by_layer, key=_natural):
            lines.append(_row(layer, "", total(by_layer[layer]), per))
    if overrides:
        lines.append("per-module overrides: " + ", ".join(f"{m}:{c}={b}" for (m, c), b in sorted(overrides.items())))
    return "\n".join(lines)


def _natural(name: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.replace("<", "~").split("."))


def stats_of(snap: Snapshot, table: dict[str, int], live_bytes: int, per_module: bool = False) -> dict[str, float]:
    """``ActivationQuantizer.stats``: the snapshot's figures per micro-batch (``table``: class -> bits,
    ``live_bytes``: held right now)."""
    per = max(snap.forwards, 1)
    all_: Usage = total(list(snap.by_class.values()))
    out: dict[str, float] = {
        "step": float(snap.step),
        "stored_bytes_peak": float(snap.peak_stored),
        "baseline_bytes_peak": float(snap.peak_baseline),
        "bf16_bytes_peak": float(snap.peak_bf16),
        "live_bytes": float(live_bytes),
        "stored_bytes_per_forward": all_.stored / per,
        "baseline_bytes_per_forward": all_.baseline / per,
        "bf16_bytes_per_forward": 2 * all_.numel / per,
        "elements_per_forward": all_.numel / per,
        "avg_bits": all_.avg_bits,
        "compression": all_.baseline / all_.stored if all_.stored else 1.0,
        "ratio_vs_bf16": all_.stored / (2 * all_.numel) if all_.numel else 1.0,
    }
    for cls in LayerClass:
        u = snap.by_class.get(cls.value)
        if u is None or not u.numel:
            continue
        out[f"class/{cls.value}/bits"] = float(table[cls.value])
        out[f"class/{cls.value}/elements"] = u.numel / per
        out[f"class/{cls.value}/stored_bytes"] = u.stored / per
        out[f"class/{cls.value}/baseline_bytes"] = u.baseline / per
        out[f"class/{cls.value}/avg_bits"] = u.avg_bits
    if per_module:
        for (module, cls_name), u in sorted(snap.by_module.items()):
            prefix = f"module/{module or '<root>'}/{cls_name}"
            out[f"{prefix}/elements"] = u.numel / per
            out[f"{prefix}/stored_bytes"] = u.stored / per
            out[f"{prefix}/baseline_bytes"] = u.baseline / per
    return out
