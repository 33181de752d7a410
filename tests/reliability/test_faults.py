"""Faults: non-finite values, a rank killed mid-run, resuming on another data-parallel size, and
what a checkpoint file can do through agoq's state.

All runs train the tiny LLaMA on the embedded corpus with ZeRO-2 and ``rel_workers.AGOQ`` (every
piece of agoq state in use: stochastic rounding of activations and gradients, error-feedback
residuals), against stock DeepSpeed where an outcome is compared.

* NaN/Inf written into a hidden state (then saved for backward, i.e. quantized by agoq) or into a
  weight's gradient, on one rank, at four steps: agoq's per-step outcome (overflow flag, skipped
  steps, finite losses/norm/parameters, whether parameters moved) equals stock DeepSpeed's.
* The reference run checkpoints every ``CKPT_EVERY`` steps. The same run is started again and rank 1
  is SIGKILLed in the middle of step ``DIE_AT`` (after checkpoint ``DIE_AT``); the launcher kills
  the survivor, as torchrun does. Relaunched, it resumes from the last checkpoint: the agoq state
  it loads equals the state snapshotted at save time, and its losses equal the reference's.
* The reference checkpoint (2 ranks) is resumed on 4 ranks and a 4-rank one on 2 ranks, stock and
  agoq side by side: DeepSpeed's default load refuses for both; a universal checkpoint reshards both
  identically (agoq's rule: model-level agoq state restored, error-feedback residuals reset to
  zero); a module-only load works for both.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from agoq_ds.testing.distributed import run_ranks
from tests.reliability import rel_workers as rw
from tests.reliability.rel_launch import launch

STEPS = 6
"""Optimizer steps of the reference run (2 micro-batches each)."""
CKPT_EVERY = 2
DIE_AT = 4
"""Rank 1 is killed during this step (0-based), right after checkpoint ``step4`` was written."""
PARITY = 0.02
"""Relative tolerance between agoq and stock losses after an optimizer step (8-bit gradients)."""

pytestmark = pytest.mark.slow


# --- fixtures: the runs, in dependency order ---------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("agoq_faults")


@pytest.fixture(scope="module")
def bundle(workdir: Path) -> list[dict]:
    """Non-finite injections, the uninterrupted reference run (checkpoints), the seed control."""
    return rw.unpack(run_ranks(rw.faults_and_reference, 2, (str(workdir / "ref"), STEPS, CKPT_EVERY)))


@pytest.fixture(scope="module")
def killed(workdir: Path) -> dict[str, Any]:
    """The same run, with rank 1 SIGKILLed in step ``DIE_AT``."""
    run = workdir / "killed"
    run.mkdir()
    spec = {
        "fn": "train_run",
        "kwargs": {"workdir": str(run), "steps": STEPS, "ckpt_every": CKPT_EVERY, "die_at_step": DIE_AT},
        "result": str(run / "result_{rank}.json"),
    }
    codes = launch(2, spec)
    logs = {r: (run / f"result_{r}.log").read_text() for r in range(2)}
    return {
        "codes": codes,
        "dir": run,
        "losses": {r: _logged(run / f"losses_run_rank{r}.jsonl") for r in range(2)},
        "logs": logs,
    }


def _logged(path: Path) -> dict[int, list[float]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {row["step"]: row["losses"] for row in rows}


def _universal(ckpt: Path, tag: str) -> str:
    """Convert ``ckpt/tag`` to a universal checkpoint ``ckpt/tag_universal`` with DeepSpeed's tool."""
    out = f"{tag}_universal"
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt / tag)]
    cmd += [
        "--output_folder",
        str(ckpt / out),
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
        "--inject_missing_state",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def grown(bundle: list[dict], workdir: Path) -> list[dict]:
    """The 2-rank reference checkpoint loaded on 4 ranks (and a 4-rank checkpoint saved)."""
    ckpt = workdir / "ref" / "ckpt"
    tag = f"step{STEPS}"
    return rw.unpack(run_ranks(rw.reshard_packed, 4, (str(ckpt), tag, _universal(ckpt, tag), "w4")))


@pytest.fixture(scope="module")
def resumed_and_shrunk(killed: dict, grown: list[dict], workdir: Path) -> list[dict]:
    """The killed run relaunched from its last checkpoint; the 4-rank checkpoint loaded on 2 ranks."""
    ckpt4 = workdir / "ref" / "ckpt_4"
    shrink = (str(ckpt4), "w4", _universal(ckpt4, "w4"), None)
    return rw.unpack(run_ranks(rw.resume_and_shrink, 2, (str(killed["dir"]), STEPS, CKPT_EVERY, shrink)))


# --- non-finite values --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_nonfinite_activations_and_gradients_same_outcome_as_stock(bundle: list[dict], dtype: str) -> None:
    injected_steps = {step for step, _ in rw.INJECTIONS}
    for rank, result in enumerate(bundle):
        stock, agoq = result["nonfinite"][dtype]["stock"], result["nonfinite"][dtype]["agoq"]
        for step, (s, a) in enumerate(zip(stock, agoq, strict=True)):
            for key in ("losses_finite", "overflow", "skipped", "norm_finite", "params_finite", "params_changed"):
                assert s[key] == a[key], (rank, step, key, s, a)
            assert a["live_bytes"] == 0, (rank, step, a)
            if step in injected_steps:
                # Never a silently finite update: the step is skipped and nothing moves.
                assert a["overflow"] and not a["params_changed"], (rank, step, a)
            else:
                assert a["params_changed"] and a["params_finite"], (rank, step, a)
        assert agoq[-1]["skipped"] == len(injected_steps), agoq[-1]


class _Masked(nn.Module):
    """A linear layer whose output is masked with -inf, then used by ``op`` (which saves it)."""

    def __init__(self, op: str) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(64, 64)
        self.op = op

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.lin(x).masked_fill(mask, float("-inf"))
        if self.op == "max":
            return h.max(dim=-1).values.sum()
        if self.op == "log_softmax":
            return torch.where(mask, 0.0, torch.log_softmax(h, -1)).sum()
        if self.op == "exp":
            return torch.exp(h).sum()
        if self.op == "amax":
            return h.amax(dim=-1).sum()
        if self.op == "logsumexp":
            return torch.logsumexp(h, dim=-1).sum()
        return (torch.softmax(h, -1) * h.clamp(min=-10)).sum()  # clamp keeps its input for backward


def _masked_grads(op: str, quantized: bool) -> torch.Tensor:
    from agoq_ds.activation import ActivationQuantizer
    from agoq_ds.config import ActivationConfig

    gen = torch.Generator().manual_seed(0)
    x, mask = torch.randn(128, 64, generator=gen), torch.rand(128, 64, generator=gen) < 0.3
    model = _Masked(op)
    quantizer = ActivationQuantizer(model, ActivationConfig(min_numel=0)).install() if quantized else None
    for _ in range(2):  # the first step is traced
        model.zero_grad()
        model(x, mask).backward()
        if quantizer is not None:
            quantizer.on_step_end()
    if quantizer is not None:
        quantizer.remove()
    return model.lin.weight.grad.clone()


def _close(op: str) -> tuple[torch.Tensor, torch.Tensor]:
    ref, got = _masked_grads(op, False), _masked_grads(op, True)
    assert bool(torch.isfinite(ref).all())  # stock autograd handles the -inf
    return ref, got


@pytest.mark.parametrize("op", ["max", "log_softmax", "exp"])
def test_minus_inf_in_a_saved_activation_handled_like_stock(op: str) -> None:
    ref, got = _close(op)
    assert bool(torch.isfinite(got).all()) and float((got - ref).norm() / ref.norm()) < 0.05


@pytest.mark.parametrize("op", ["amax", "logsumexp", "clamp"])
def test_minus_inf_in_a_saved_activation_never_changes_the_gradient(op: str) -> None:
    ref, got = _close(op)
    assert bool(torch.isfinite(got).all()), "NaN gradient where stock DeepSpeed's is finite"
    assert float((got - ref).norm() / ref.norm()) < 0.05, "silently wrong finite gradient"


# --- a rank killed mid-run, relaunched --------------------------------------------------------------------


def test_a_killed_rank_takes_the_job_down_after_its_last_checkpoint(killed: dict) -> None:
    assert killed["codes"][1] == -9, killed["logs"][1][-3000:]  # SIGKILL
    assert killed["codes"][0] != 0  # the survivor failed in a collective or was killed by the launcher
    ckpt = killed["dir"] / "ckpt"
    assert (ckpt / "latest").read_text().strip() == f"step{DIE_AT}"
    for rank in range(2):
        assert sorted(killed["losses"][rank]) == list(range(DIE_AT)), killed["losses"][rank]


def test_same_seed_and_config_bit_identical_losses_across_processes(bundle: list[dict], killed: dict) -> None:
    """The killed run is a second run of the reference in new processes: up to the kill, every
    micro-batch loss is bit-identical (stochastic rounding of activations and gradients seeded)."""
    for rank in range(2):
        reference = bundle[rank]["reference"]["losses"]
        for step, losses in killed["losses"][rank].items():
            assert losses == reference[step], (rank, step, losses, reference[step])


def test_the_seed_drives_the_rounding(bundle: list[dict]) -> None:
    for result in bundle:
        a, b = result["seeds"].values()
        assert a[:2] == b[:2]  # before the first update the forward pass does not depend on the seed
        assert a[2:] != b[2:]  # after it, the rounding did


def test_relaunch_resumes_with_all_agoq_state_and_the_same_losses(bundle: list[dict], resumed_and_shrunk) -> None:
    for rank in range(2):
        resumed = resumed_and_shrunk[rank]["resumed"]
        reference = bundle[rank]["reference"]["losses"]
        assert resumed["start"] == DIE_AT
        assert resumed["residual_nonzero"], "the checkpoint should carry error-feedback residuals"
        assert resumed["restored"], "agoq state after loading differs from the state at save time"
        assert sorted(resumed["losses"]) == list(range(DIE_AT, STEPS))
        for step, losses in resumed["losses"].items():
            assert losses == pytest.approx(reference[step], rel=1e-6, abs=1e-7), (rank, step)


# --- another data-parallel size -----------------------------------------------------------------------------


def _check_reshard(results: list[dict], saved_world: int, reference_state: dict | None) -> None:
    for rank, res in enumerate(results):
        stock, agoq = res["stock"], res["agoq"]
        # DeepSpeed's own rule for a plain ZeRO checkpoint: refuse another DP size, agoq or not.
        for r in (stock, agoq):
            assert r["default_load"].startswith("ZeRORuntimeException") and "world size" in r["default_load"], r
        # A universal checkpoint: both reshard the same weights and optimizer moments.
        assert stock["params_match"] and agoq["params_match"], rank
        assert torch.equal(stock["fp32_partition"], agoq["fp32_partition"]), rank
        assert stock["moments"].numel() > 0 and torch.equal(stock["moments"], agoq["moments"]), rank
        assert stock["global_steps"] == agoq["global_steps"] > 0
        # agoq's documented rule: model-level state restored, error-feedback residuals reset.
        assert agoq["residual_zero"] and agoq["client_agoq_consumed"], rank
        if reference_state is not None:
            assert rw.w._same_state(agoq["activation_state"], reference_state), rank
        # Training proceeds: the forward passes before the first update are identical, the rest close.
        su, au = stock["universal_losses"], agoq["universal_losses"]
        assert au[:2] == su[:2], (su, au)
        assert all(math.isfinite(x) for x in au) and au == pytest.approx(su, rel=PARITY), (su, au)
        assert agoq["module_only_params_match"] and stock["module_only_params_match"]
        assert all(math.isfinite(x) for x in agoq["module_only_losses"])
        assert agoq["module_only_losses"][:2] == stock["module_only_losses"][:2]


def test_resume_on_more_ranks_2_to_4(grown: list[dict], workdir: Path) -> None:
    state = torch.load(workdir / "ref" / f"agoq_state_step{STEPS}_rank0.pt", weights_only=True)["model"]
    _check_reshard(grown, 2, state)


def test_resume_on_fewer_ranks_4_to_2(resumed_and_shrunk: list[dict]) -> None:
    _check_reshard([r["shrink"] for r in resumed_and_shrunk], 4, None)


# --- checkpoint files -------------------------------------------------------------------------------------


def _plain(value: Any) -> bool:
    """Only tensors, numbers, strings, None, and lists/dicts of them (what weights_only allows)."""
    if isinstance(value, dict):
        return all(isinstance(k, int | str) and _plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, torch.Tensor | int | float | str | bool)


def test_agoq_checkpoint_state_loads_with_weights_only(bundle: list[dict], workdir: Path) -> None:
    from agoq_ds.constants import CHECKPOINT_KEY
    from agoq_ds.gradient.store import STATE_KEY

    tag_dir = workdir / "ref" / "ckpt" / f"step{STEPS}"
    found = {"model": 0, "optimizer": 0}
    for path in sorted(tag_dir.glob("*.pt")):
        whole = torch.load(path, map_location="cpu", weights_only=False)  # our own file: trusted here
        parts = []
        if CHECKPOINT_KEY in whole:
            parts.append(("model", whole[CHECKPOINT_KEY]))
        optimizer = whole.get("optimizer_state_dict")
        if isinstance(optimizer, dict) and STATE_KEY in optimizer:
            parts.append(("optimizer", optimizer[STATE_KEY]))
        for kind, state in parts:
            found[kind] += 1
            assert _plain(state), (path.name, kind)
            buf = io.BytesIO()
            torch.save(state, buf)
            buf.seek(0)
            assert rw.w._same_state(torch.load(buf, weights_only=True), state), (path.name, kind)
    assert found == {"model": 1, "optimizer": 2}, found
