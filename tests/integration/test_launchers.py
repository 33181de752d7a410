"""End to end: every launch path users take hands `deepspeed.initialize` the AGoQ engine, and the
run's own statistics show quantized storage and communication (2 real CPU ranks, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agoq_ds.testing.distributed import free_port
from agoq_ds.testing.shutdown import CPU_ALLREDUCE_PREFIX, SHM_DIR

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PRETRAIN = ["examples/pretrain_llama.py", "--model", "tiny", "--steps", "3", "--eval-every", "3", "--seq-len", "64"]
HF = ["examples/hf_trainer_finetune.py", "--model", "tiny", "--steps", "3", "--seq-len", "64"]

pytestmark = pytest.mark.slow


def _launch(cmd: list[str], out: Path) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert out.is_file(), proc.stdout[-3000:]
    # DeepSpeed's CPU all-reduce (the deepspeed launcher sets LOCAL_SIZE) made a /dev/shm workspace per
    # rank; the examples' end_distributed_run unlinks them.
    port = cmd[cmd.index("--master_port") + 1] if "--master_port" in cmd else env["MASTER_PORT"]
    left = sorted(SHM_DIR.glob(f"{CPU_ALLREDUCE_PREFIX}_{os.getuid()}_*_{port}_*"))
    assert not left, f"the run left {[p.name for p in left]}"
    return json.loads(out.read_text())


def _assert_quantized(stats: dict) -> None:
    assert stats["activation/compression"] > 2.5, stats
    assert stats["gradient/comm_bytes_ratio_bf16"] <= 0.53, stats
    assert stats["gradient/buffer_bytes_ratio_fp32"] <= 0.27, stats


@pytest.mark.parametrize(
    "launcher",
    [
        pytest.param(
            lambda: [str(BIN / "deepspeed"), "--num_accelerators", "2", "--master_port", str(free_port())],
            id="deepspeed",
        ),
        pytest.param(
            lambda: [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())], id="torchrun"
        ),
    ],
)
def test_pretrain_script_gets_agoq_engine(launcher, tmp_path: Path) -> None:
    run = _launch(launcher() + PRETRAIN + ["--deepspeed_config", "ds_configs/zero2_agoq.json"], tmp_path / "run.json")
    assert run["engine"] == "AgoqEngine"
    _assert_quantized(run["agoq_stats"])
    assert run["activation_bytes_per_micro_batch"][-1] < 0.4 * run["activation_baseline_bytes_per_micro_batch"][-1]


def test_config_without_block_gets_stock_engine(tmp_path: Path) -> None:
    cmd = [str(BIN / "deepspeed"), "--num_accelerators", "2", "--master_port", str(free_port())]
    run = _launch(cmd + PRETRAIN + ["--deepspeed_config", "ds_configs/zero2_baseline.json"], tmp_path / "run.json")
    assert run["engine"] == "DeepSpeedEngine" and "agoq_stats" not in run


@pytest.mark.parametrize(
    "launcher",
    [
        pytest.param(
            lambda: [
                str(BIN / "accelerate"),
                "launch",
                "--use_deepspeed",
                "--deepspeed_config_file",
                "ds_configs/hf_zero2_agoq.json",
                "--num_processes",
                "2",
                "--num_machines",
                "1",
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                "--main_process_port",
                str(free_port()),
            ],
            id="accelerate",
        ),
        pytest.param(
            lambda: [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())],
            id="hf-trainer-torchrun",
        ),
    ],
)
def test_hf_trainer_gets_agoq_engine(launcher, tmp_path: Path) -> None:
    run = _launch(launcher() + HF + ["--deepspeed", "ds_configs/hf_zero2_agoq.json"], tmp_path / "run.json")
    assert run["engine"] == "AgoqEngine"
    _assert_quantized(run["agoq_stats"])


def test_hf_trainer_torch_compile(tmp_path: Path) -> None:
    """``TrainingArguments(torch_compile=True)``: accelerate calls ``engine.compile()``; agoq's hooks run
    inside the compiled graphs (issue 26)."""
    cmd = [str(BIN / "deepspeed"), "--num_accelerators", "2", "--master_port", str(free_port())]
    run = _launch(cmd + HF + ["--deepspeed", "ds_configs/hf_zero2_agoq.json", "--torch-compile"], tmp_path / "run.json")
    assert run["engine"] == "AgoqEngine" and run["compiled"]
    stats = run["agoq_stats"]
    assert stats["activation/compiled_graphs"] >= 1 and stats["activation/compiled_runs"] >= 2, stats
    _assert_quantized(stats)


def test_hf_trainer_config_as_dict(tmp_path: Path) -> None:
    cmd = [str(BIN / "deepspeed"), "--num_accelerators", "2", "--master_port", str(free_port())]
    run = _launch(
        cmd + HF + ["--deepspeed", "ds_configs/hf_zero2_agoq.json", "--config-as-dict"], tmp_path / "run.json"
    )
    assert run["engine"] == "AgoqEngine"
    _assert_quantized(run["agoq_stats"])


def test_hf_trainer_zero3_gets_agoq_engine_and_8bit_gradients(tmp_path: Path) -> None:
    """HF Trainer at ZeRO stage 3 (``ds_configs/hf_zero3_agoq.json``), launched with torchrun."""
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    run = _launch(cmd + HF + ["--deepspeed", "ds_configs/hf_zero3_agoq.json"], tmp_path / "run.json")
    assert run["engine"] == "AgoqEngine" and run["zero_stage"] == 3
    assert run["gradient_host"] == "AgoqStage3Optimizer"
    _assert_quantized(run["agoq_stats"])
    assert run["agoq_stats"]["gradient/comm_bytes_ratio_fp32"] <= 0.27


def test_pretrain_script_zero3(tmp_path: Path) -> None:
    """The deepspeed launcher with ``ds_configs/zero3_agoq.json``."""
    cmd = [str(BIN / "deepspeed"), "--num_accelerators", "2", "--master_port", str(free_port())]
    run = _launch(cmd + PRETRAIN + ["--deepspeed_config", "ds_configs/zero3_agoq.json"], tmp_path / "run.json")
    assert run["engine"] == "AgoqEngine"
    _assert_quantized(run["agoq_stats"])
    assert run["agoq_stats"]["gradient/comm_bytes_ratio_fp32"] <= 0.27


def _assert_offloaded_in_8bit(stats: dict) -> None:
    """Gradients crossed to the host once per step in int8: a quarter of stock's fp32 boundary copy or
    less (``gradient/offload_bytes_baseline``: what DeepSpeed's own offload path moves)."""
    assert 0 < stats["gradient/offload_bytes"] <= 0.27 * stats["gradient/offload_bytes_baseline"], stats


def test_pretrain_script_zero2_offload(tmp_path: Path) -> None:
    """The deepspeed launcher with ZeRO-Offload (``ds_configs/zero2_offload_agoq.json``: optimizer on the
    host, DeepSpeedCPUAdam, pinned memory)."""
    cmd = [str(BIN / "deepspeed"), "--num_accelerators", "2", "--master_port", str(free_port())]
    config = ["--deepspeed_config", "ds_configs/zero2_offload_agoq.json"]
    run = _launch(cmd + PRETRAIN + config, tmp_path / "run.json")
    assert run["engine"] == "AgoqEngine"
    _assert_quantized(run["agoq_stats"])
    _assert_offloaded_in_8bit(run["agoq_stats"])


def test_hf_trainer_zero3_offload(tmp_path: Path) -> None:
    """HF Trainer with HF's DeepSpeed guide's ZeRO-3 example (optimizer and parameters offloaded to the
    host, pinned; ``ds_configs/hf_zero3_offload_agoq.json``), launched with torchrun."""
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    run = _launch(cmd + HF + ["--deepspeed", "ds_configs/hf_zero3_offload_agoq.json"], tmp_path / "run.json")
    assert run["engine"] == "AgoqEngine" and run["zero_stage"] == 3
    assert run["gradient_host"] == "AgoqStage3Optimizer"
    _assert_quantized(run["agoq_stats"])
    _assert_offloaded_in_8bit(run["agoq_stats"])
