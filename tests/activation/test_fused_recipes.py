"""The fused dequantize-and-rebuild kernels (``quant/triton_rebuild.py``, ``activation/fused_recipes.py``)
on a real bf16 LLaMA backward in Triton's CPU interpreter, against the unfused recipes.

The case runs in a subprocess with ``TRITON_INTERPRET=1`` set before Triton is imported. Every recipe
of the default policy (an RMSNorm's normalised value and output, the SiLU output, the gating product)
must take the fused path; the norm's tensors must equal the unfused path bit for bit (the same fp32
products, rounded once to bf16 where it rounds); SiLU's may differ by the last bit of ``exp``, so by at
most one bf16 rounding step (``BF16_ULP``); every stored span must be dequantized exactly once (by the
dequantize op or inside a fused kernel); the gradients must match the unfused step's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.activation.fused_recipe_cases import BF16_ULP

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.activation.fused_recipe_cases"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        pytest.fail(f"interpreter subprocess failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_default_recipe_takes_the_fused_path(report: dict) -> None:
    kinds = report["kinds"]
    assert set(kinds) == {"norm_h", "norm_y", "silu", "gate"}, kinds
    for kind, entry in kinds.items():
        assert entry["fused"] == entry["count"] > 0, (kind, entry)


def test_fused_results_equal_the_unfused_recipes(report: dict) -> None:
    assert report["ok"], report["detail"]
    assert report["kinds"]["norm_h"]["max_ulps"] == report["kinds"]["norm_y"]["max_ulps"] == 0.0
    assert report["kinds"]["gate"]["max_ulps"] <= 1.0


def test_each_stored_span_is_dequantized_once(report: dict) -> None:
    assert report["fused_reads"] > 0
    assert report["dequantize_calls"] + report["fused_reads"] == report["stored"], report


def test_gradients_match_the_unfused_step(report: dict) -> None:
    assert report["grad_max_rel_diff"] <= BF16_ULP, report["grad_max_rel_diff"]
