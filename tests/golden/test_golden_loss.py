"""Golden-loss check (torchtitan pattern): a short fixed-seed run of agoq and of stock DeepSpeed must
reproduce the checked-in per-step losses (``reference_losses.json``) within ``golden_loss.TOLERANCE``.

The stock golden separates the causes of a failure: stock drifting too means torch/DeepSpeed/the CPU
changed (regenerate after checking); only agoq drifting means agoq's numerics changed. The same run
also proves the check has teeth (a 1% activation dequantization error must be caught), that benign
changes (other matmul kernels, other stochastic-rounding draws) pass, that torch's kernels of other
CPU kinds (AVX2-only, unvectorised) pass, and that two runs are bit-for-bit identical.
Regenerate with ``python tests/golden/golden_loss.py --regenerate``.
"""

from __future__ import annotations

import json

import pytest

from tests.golden import golden_loss as g

pytestmark = pytest.mark.slow

RUNS = [
    ("stock", None),
    ("agoq", None),
    ("agoq", None),
    *[("agoq", name) for name in sorted(g.PERTURBATIONS)],
]


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(g.REFERENCE.read_text())


@pytest.fixture(scope="module")
def fresh() -> dict[str, list[list[float]]]:
    return g.collect(RUNS)


@pytest.fixture(scope="module", params=sorted(g.KERNEL_PATHS))
def other_kernels(request) -> tuple[str, dict[str, list[list[float]]]]:
    return request.param, g.collect([("stock", None), ("agoq", None)], kernels=request.param)


def _report(problems: list[str]) -> str:
    return "\n  ".join(problems[:8]) + (f"\n  ... {len(problems) - 8} more" if len(problems) > 8 else "")


def test_reference_matches_this_setup(reference: dict) -> None:
    setup = reference["setup"]
    assert (setup["steps"], setup["micro_batch"], setup["grad_accum"], setup["seq_len"], setup["world_size"]) == (
        g.STEPS,
        g.MICRO_BATCH,
        g.GRAD_ACCUM,
        g.SEQ,
        g.WORLD,
    ), "golden_loss.py's setup changed: regenerate the reference"
    assert reference["configs"] == {v: g.ds_config(b) for v, b in g.VARIANTS.items()}
    assert reference["tolerance"] == g.TOLERANCE
    assert reference["setup"]["bf16"] is False and "bf16" not in g.ds_config({})
    for variant in g.VARIANTS:
        assert [len(r) for r in reference["losses"][variant]] == [g.STEPS * g.GRAD_ACCUM] * g.WORLD


def test_stock_matches_reference(fresh: dict, reference: dict) -> None:
    problems = g.mismatches(reference["losses"]["stock"], fresh["stock"], reference["tolerance"])
    assert not problems, (
        "stock DeepSpeed no longer reproduces its golden losses: torch/DeepSpeed/transformers or the CPU "
        f"changed (reference: {reference['versions']}, now: {g.versions()}). Not an agoq regression; "
        "check, then regenerate with `python tests/golden/golden_loss.py --regenerate`.\n  " + _report(problems)
    )


def test_agoq_matches_reference(fresh: dict, reference: dict) -> None:
    problems = g.mismatches(reference["losses"]["agoq"], fresh["agoq"], reference["tolerance"])
    stock_ok = not g.mismatches(reference["losses"]["stock"], fresh["stock"], reference["tolerance"])
    cause = (
        "agoq's numerics changed (stock DeepSpeed still matches its golden): a regression unless intended"
        if stock_ok
        else "stock DeepSpeed drifted as well: most likely a torch/DeepSpeed/CPU change, see the stock test"
    )
    assert not problems, f"{cause}.\n  " + _report(problems)


def test_two_runs_are_identical(fresh: dict) -> None:
    assert fresh["agoq"] == fresh["agoq#2"]


def test_agoq_is_active(fresh: dict) -> None:
    """agoq's losses differ from stock's after the first update (else the golden tests nothing)."""
    assert fresh["agoq"][0][0] == fresh["stock"][0][0]  # same model, same first batch
    assert fresh["agoq"] != fresh["stock"]


@pytest.mark.parametrize("broken", sorted(g.BREAKS))
def test_check_catches_a_broken_quantizer(fresh: dict, reference: dict, broken: str) -> None:
    problems = g.mismatches(reference["losses"]["agoq"], fresh[g.run_key("agoq", broken)], reference["tolerance"])
    assert problems, f"{broken} went unnoticed"


@pytest.mark.parametrize("benign", sorted(g.BENIGN))
def test_check_passes_a_benign_float_change(fresh: dict, reference: dict, benign: str) -> None:
    """Other matmul kernels (as on another CPU) stay within the tolerance."""
    problems = g.mismatches(reference["losses"]["agoq"], fresh[g.run_key("agoq", benign)], reference["tolerance"])
    assert not problems, _report(problems)


def test_other_cpu_kinds_kernels_pass(other_kernels: tuple, reference: dict) -> None:
    """torch's kernels of another CPU kind (spawned ranks with ATen/MKL/oneDNN told to use them) move
    stock's losses in the last bits and agoq's within the spread of its rounding noise."""
    kernels, losses = other_kernels
    for variant in g.VARIANTS:
        problems = g.mismatches(reference["losses"][variant], losses[variant], reference["tolerance"])
        assert not problems, f"{variant} with {kernels} kernels:\n  " + _report(problems)
    assert g.mean_rel_diff(reference["losses"]["stock"], losses["stock"]) < 1e-5  # fp32: last-bit differences
