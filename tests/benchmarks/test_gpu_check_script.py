"""scripts/gpu_check.sh runs end to end without a GPU (GPU_CHECK_DEVICE=cpu: the same stages on tiny
shapes, the install left alone and the CUDA kernel table skipped), so the one command a GPU session
runs cannot rot between the sessions that have one: its stage list and time budget, the stages it
skips when the budget cannot cover them, and the two files (archive and summary) it leaves in OUT."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

pytestmark = pytest.mark.slow


def run_check(out: Path, *args: str) -> tuple[str, dict[str, bytes]]:
    """Run the script on the CPU (two step variants, to stay short); return its summary and the
    archive's files (name -> bytes)."""
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "GPU_STEP_ARGS": "--variants stock agoq"}
    proc = subprocess.run(
        [str(SCRIPT), *args, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    assert summary in proc.stdout  # printed too
    assert "Traceback" not in summary, summary
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    return summary, files


def test_script_is_executable() -> None:
    assert os.access(SCRIPT, os.X_OK), "README runs it as scripts/gpu_check.sh: it must be executable"


def test_stages_run_into_one_archive_and_summary(tmp_path: Path) -> None:
    summary, files = run_check(tmp_path, "--stages", "report,step_76m", "--budget", "600")
    assert "report: ok" in summary and "step_76m: ok" in summary, summary
    assert "step_076b" not in summary.split("\n---")[0]  # not asked for: neither run nor listed
    assert {"gpu_check/report.log", "gpu_check/step_76m.log", "gpu_check/summary.txt"} <= set(files)
    records = json.loads(files["gpu_check/step_76m.json"])["records"]
    by_variant = {r["variant"]: r for r in records}
    assert set(by_variant) >= {"stock", "agoq"}
    for r in records:
        assert "error" not in r, r["error"]
        assert {"replay_engaged", "replayed_forwards", "replay_forwards", "backends", "fused_rebuild_calls"} <= set(r)
    agoq = by_variant["agoq"]
    assert agoq["replay_forwards"] > 0 and agoq["replayed_forwards"] >= 1 and agoq["replay_engaged"] is True
    assert set(agoq["backends"]) == {f"{op}/{bits}" for op in ("quantize", "dequantize") for bits in (2, 4, 8)}
    assert by_variant["stock"]["replay_engaged"] is None and by_variant["stock"]["backends"] == {}
    assert "replay" in summary  # the table's columns come back in the summary


def test_a_stage_the_budget_cannot_cover_is_skipped(tmp_path: Path) -> None:
    summary, files = run_check(tmp_path, "--stages", "report,step_76m", "--budget", "2")
    assert "report: skipped (expects" in summary and "step_76m: skipped (expects" in summary, summary
    assert "gpu_check/summary.txt" in files


def test_unknown_stage_is_refused(tmp_path: Path) -> None:
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu"}
    proc = subprocess.run([str(SCRIPT), "--stages", "nope", str(tmp_path)], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown stage nope" in proc.stderr
