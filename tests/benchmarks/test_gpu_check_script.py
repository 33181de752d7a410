"""scripts/gpu_check.sh runs end to end without a GPU (GPU_CHECK_DEVICE=cpu: the same stages on the tiny
shape, the install left alone and the CUDA kernel table skipped), so the one command a GPU session
runs cannot rot between the sessions that have one."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEP_STAGES = ("gpu_step_76m", "gpu_step_76m_zero3", "gpu_step_076b")

pytestmark = pytest.mark.slow


def test_gpu_check_runs_every_stage_on_cpu(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "gpu_check.sh"
    assert os.access(script, os.X_OK), "README runs it as scripts/gpu_check.sh: it must be executable"
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(script), str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert "Traceback" not in summary, summary
    for stage in ("report", "pytest_gpu", *STEP_STAGES):
        assert f"{stage}: ok" in summary, summary
    for stage in ("build", "gpu_kernels"):
        assert f"{stage}: skipped" in summary, summary
    for stage in STEP_STAGES:
        records = json.loads((tmp_path / f"{stage}.json").read_text())["records"]
        assert records and all("error" not in r for r in records), stage
        assert {r["variant"] for r in records} >= {"stock", "agoq"}
