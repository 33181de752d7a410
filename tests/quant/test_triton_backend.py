"""The Triton quantization kernels against the pure-torch reference, in Triton's CPU interpreter.

The kernels run in a subprocess with ``TRITON_INTERPRET=1`` set before Triton is imported (this
process may import Triton normally for the compile checks). ``triton_interpret_cases.py`` holds
the cases; each becomes one test here. Round-to-nearest must be bit-identical (one documented
exception, see ``ZERO_SIGN``); stochastic rounding must be unbiased within 5 sigma.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.quant.triton_interpret_cases import CASES

ROOT = Path(__file__).resolve().parents[2]
HELPER = "tests.quant.triton_interpret_cases"

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def interpret_results() -> dict[str, dict]:
    """Run every case once in an interpreter subprocess; map case name -> result."""
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run(
        [sys.executable, "-m", HELPER], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        pytest.fail(f"interpreter subprocess failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {r["case"]: r for r in results}


@pytest.mark.parametrize("case", CASES)
def test_interpreted_kernel(case: str, interpret_results: dict[str, dict]) -> None:
    result = interpret_results.get(case)
    assert result is not None, f"case {case} did not run"
    assert result["ok"], result["detail"]


def test_every_case_reported(interpret_results: dict[str, dict]) -> None:
    assert sorted(interpret_results) == sorted(CASES)


def test_unavailable_without_gpu() -> None:
    from agoq_ds.quant import triton_backend

    reason = triton_backend.unavailable_reason()
    if torch.cuda.is_available():
        assert reason is None
    else:
        assert reason is not None and "no GPU" in reason


def test_registry_reports_triton_reason() -> None:
    from agoq_ds.quant import backends

    st = backends.status("triton")
    assert st.device_types == ("cuda",)
    if not torch.cuda.is_available():
        assert not st.available and "GPU" in st.detail


def test_tiling() -> None:
    from agoq_ds.quant import triton_backend

    assert triton_backend.rows_per_program(32, 4096) == 128
    assert triton_backend.rows_per_program(4096, 4096) == 1
    assert triton_backend.rows_per_program(4096, 1024) == 1
    assert triton_backend.COMPILE_OPTIONS["enable_fp_fusion"] is False


def _unequal_to_itself(value: object) -> bool:
    raw = getattr(value, "value", value)  # a tl.constexpr wraps its value
    return isinstance(raw, float) and raw != raw


def test_kernel_globals_compare_equal_to_themselves() -> None:
    """Triton re-checks, at every launch on a GPU, that each module global a kernel read still equals
    its compile-time value; a NaN constant never does, so every launch would fail ("Global variable
    _NAN has changed since we compiled this kernel"). The interpreter skips the check: guard here."""
    triton = pytest.importorskip("triton")
    from agoq_ds.quant import triton_backend

    bad = [name for name, value in vars(triton_backend).items() if _unequal_to_itself(value)]
    assert not bad, f"module globals that do not equal themselves (build them inside the kernel): {bad}"
    assert _unequal_to_itself(triton.language.constexpr(float("nan")))  # the guard can fail
