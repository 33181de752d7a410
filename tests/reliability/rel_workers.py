"""Rank functions of the reliability tests.

They run on real gloo ranks through ``agoq_ds.testing.distributed.run_ranks`` (top level, so spawn
can pickle them) or, for the run that is killed, as a module started by ``rel_launch.launch``
(``python -m tests.reliability.rel_workers '<json>'`` from the repository root). Each returns plain
numbers and flags; the assertions live in the test modules.
"""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from tests.integration import engine_workers as w
from tests.reliability.rel_grad_workers import pack, unpack  # noqa: F401

AGOQ = {
    "activation": {"min_numel": 1024, "rounding": "stochastic"},
    "gradient": {"error_feedback": True},
    "log_summary": False,
}
"""The agoq block of the fault and resume runs: every piece of agoq state in use (stochastic
rounding of activations and gradients, error-feedback residuals)."""


def _quiet() -> None:
    import logging

    from deepspeed.utils import logger

    logger.setLevel(logging.ERROR)


# --- configs through deepspeed.initialize ---------------------------------------------------------


def _clean_rejection(exc: BaseException) -> str | None:
    """``None`` when ``exc`` was raised by agoq before DeepSpeed built anything, else what is wrong."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames or "/agoq_ds/" not in frames[-1].filename:
        return f"raised outside agoq_ds: {frames[-1].filename if frames else '?'}"
    inside = [f.filename for f in frames if "/deepspeed/runtime/" in f.filename]
    if inside:
        return f"traceback passes through DeepSpeed's runtime: {inside}"
    if exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        return f"chained to {type(exc.__cause__ or exc.__context__).__name__}"
    return None


def _cheap(block: Any) -> Any:
    """The block with budget-mode calibration shortened to one step (two steps are trained)."""
    budget = block.get("activation", {}).get("budget") if isinstance(block.get("activation"), dict) else None
    if isinstance(budget, dict) and isinstance(budget.get("calibration_steps"), int):
        budget["calibration_steps"] = 1
    return block


def initialize_properties(rank: int, world: int, n_valid: int, n_invalid: int) -> dict[str, Any]:
    """Hypothesis samples of valid blocks (engine built, two optimizer steps), invalid blocks and
    unsupported DeepSpeed settings (clean rejection) through ``deepspeed.initialize``."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from agoq_ds import quant
    from agoq_ds.config import AgoqConfigError, parse_agoq_config
    from agoq_ds.deepspeed.unsupported import UnsupportedConfigError
    from tests.reliability import rel_config_schema as cs

    _quiet()
    out: dict[str, Any] = {"valid_trained": 0, "valid_stock": 0, "backend_unavailable": 0, "invalid": 0}
    out.update(unsupported=0, failures=[])
    quiet = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
    available = {s.name for s in quant.all_status() if s.available}

    @settings(quiet, max_examples=n_valid)
    @given(block=cs.valid_blocks().map(_cheap), stage=st.sampled_from([1, 2]), bf16=st.booleans())
    def valid_case(block: dict, stage: int, bf16: bool) -> None:
        config = w.ds_config(stage=stage, agoq=block, bf16=bf16)
        cfg = parse_agoq_config(block)
        try:
            if cfg.enabled and cfg.kernel_backend not in ("auto", *available):
                try:
                    w.make_engine(config)
                except AgoqConfigError as exc:
                    assert "agoq.kernel_backend" in str(exc) and "available here" in str(exc), str(exc)
                    assert _clean_rejection(exc) is None, _clean_rejection(exc)
                    out["backend_unavailable"] += 1
                    return
                raise AssertionError(f"kernel_backend={cfg.kernel_backend} is unavailable but was accepted")
            engine = w.make_engine(config)
            expected = "AgoqEngine" if cfg.enabled else "DeepSpeedEngine"
            assert type(engine).__name__ == expected, (type(engine).__name__, block)
            losses = w.train(engine, w.data_stream(rank, world), 2)
            assert all(math.isfinite(x) for x in losses), losses
            if cfg.enabled:
                stats = engine.agoq_stats()
                assert stats.get("activation/live_bytes", 0.0) == 0.0, stats
                out["valid_trained"] += 1
            else:
                out["valid_stock"] += 1
            engine.destroy()
        finally:
            quant.set_preferred("auto")  # the preference is process-wide; examples stay independent

    def rejected(config: dict, kind: type, expected: str) -> None:
        try:
            engine = w.make_engine(config)
        except kind as exc:
            assert expected in str(exc), (expected, str(exc))
            problem = _clean_rejection(exc)
            assert problem is None, (problem, str(exc))
            return
        finally:
            quant.set_preferred("auto")
        engine.destroy()
        raise AssertionError(f"accepted: {config}")

    def off(block: dict) -> bool:
        return block.get("enabled") is False  # a switched-off block is never read (stock DeepSpeed)

    @settings(quiet, max_examples=n_invalid)
    @given(sample=cs.invalid_blocks().filter(lambda s: s[1] and not off(s[0])), stage=st.sampled_from([1, 2]))
    def invalid_case(sample: tuple[dict, list], stage: int) -> None:
        block, _ = sample
        try:
            parse_agoq_config(block)
        except AgoqConfigError as exc:
            message = str(exc)
        rejected(w.ds_config(stage=stage, agoq=block), AgoqConfigError, message)
        out["invalid"] += 1

    unsupported = [
        ({"stage": 3, "zero_quantized_gradients": True}, {}, "zero_optimization.zero_quantized_gradients=true"),
        (
            {"stage": 3, "offload_optimizer": {"device": "nvme"}},
            {},
            "zero_optimization.offload_optimizer.device='nvme'",
        ),
        ({"stage": 2}, {"fp16": {"enabled": True}}, "fp16.enabled=true is not supported on CPU"),
    ]

    @settings(quiet, max_examples=len(unsupported) * 2)
    @given(case=st.sampled_from(unsupported), block=cs.valid_blocks())
    def unsupported_case(case: tuple, block: dict) -> None:
        zero, extra, expected = case
        cfg = parse_agoq_config(block)
        if not (cfg.enabled and cfg.gradient.enabled) or cfg.kernel_backend not in ("auto", *available):
            return
        if "offload" in expected:  # refused when 8-bit gradients are asked for; by default they go stock
            gradient = block.get("gradient")
            block = {**block, "gradient": {**(gradient if isinstance(gradient, dict) else {}), "enabled": True}}
        config = w.ds_config(agoq=block, **extra)
        config["zero_optimization"] = {**zero, "reduce_bucket_size": 200_000}
        rejected(config, UnsupportedConfigError, expected)
        out["unsupported"] += 1

    valid_case()
    invalid_case()
    unsupported_case()
    return out


# --- training runs that are checkpointed, killed and resumed ------------------------------------------


def agoq_state(engine) -> dict[str, Any]:
    """Every piece of agoq state a checkpoint must carry: the model-level state (activation policy,
    calibration, rounding stream) and the gradient optimizer's (error-feedback residuals, step)."""
    from agoq_ds.gradient.store import STATE_KEY

    return {"model": engine.agoq_state_dict(), "gradient": engine.optimizer.state_dict().get(STATE_KEY)}


def _nonzero_residual(state: dict[str, Any]) -> bool:
    grad = state.get("gradient") or {}
    parts = [*grad.get("per_step_residuals", {}).values(), *grad.get("carried_residuals", {}).values()]
    return any(p is not None and int(torch.count_nonzero(p["codes"])) > 0 for p in parts)


def train_run(
    rank: int,
    world: int,
    workdir: str,
    steps: int,
    ckpt_every: int,
    resume: bool = False,
    die_at_step: int | None = None,
    die_rank: int = 1,
    tag: str = "run",
) -> dict[str, Any]:
    """Train ``steps`` optimizer steps of the tiny LLaMA with ``AGOQ`` (ZeRO-2, 2 micro-batches per
    step), checkpointing every ``ckpt_every`` steps into ``workdir/ckpt`` and snapshotting the agoq
    state next to each checkpoint. ``resume`` starts from the latest checkpoint and compares the
    loaded agoq state with that snapshot. With ``die_at_step``, rank ``die_rank`` SIGKILLs itself in
    the second backward of that step. Micro-batch losses are appended to ``losses_<tag>_rank<r>.jsonl``
    as they happen (a killed run cannot return them)."""
    _quiet()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "ckpt"
    engine = w.make_engine(w.ds_config(agoq=AGOQ))
    start, restored, loaded_state = 0, None, None
    if resume:
        load_path, _ = engine.load_checkpoint(str(ckpt))
        assert load_path is not None, f"no checkpoint in {ckpt}"
        start = engine.global_steps
        snapshot = torch.load(work / f"agoq_state_step{start}_rank{rank}.pt", weights_only=True)
        loaded_state = agoq_state(engine)
        restored = w._same_state(loaded_state, snapshot)
    stream = w.data_stream(rank, world, skip_micro_batches=start * engine.gradient_accumulation_steps())
    log = (work / f"losses_{tag}_rank{rank}.jsonl").open("a")
    losses: dict[int, list[float]] = {}
    for step in range(start, steps):
        if step == die_at_step and rank == die_rank:
            _die_in_second_backward(engine)
        losses[step] = w.train(engine, stream, 1)
        log.write(json.dumps({"step": step, "losses": losses[step]}) + "\n")
        log.flush()
        os.fsync(log.fileno())
        if (step + 1) % ckpt_every == 0:
            engine.save_checkpoint(str(ckpt), tag=f"step{step + 1}")
            torch.save(agoq_state(engine), work / f"agoq_state_step{step + 1}_rank{rank}.pt")
    log.close()
    return {
        "losses": losses,
        "start": start,
        "restored": restored,
        "residual_nonzero": _nonzero_residual(loaded_state) if loaded_state else None,
    }


def _die_in_second_backward(engine) -> None:
    calls = {"n": 0}
    weight = engine.module.model.embed_tokens.weight  # its gradient is the last one of a backward

    def die(grad: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return grad

    weight.register_hook(die)


def seed_control(rank: int, world: int, seeds: tuple[int, int], steps: int) -> dict[int, list[float]]:
    """Losses of ``steps`` steps for two agoq seeds (same data and model): the rounding is live."""
    _quiet()
    out = {}
    for seed in seeds:
        engine = w.make_engine(w.ds_config(agoq={**AGOQ, "seed": seed}))
        out[seed] = w.train(engine, w.data_stream(rank, world), steps)
        engine.destroy()
    return out


# --- non-finite values: agoq versus stock DeepSpeed ------------------------------------------------

INJECTIONS: dict[tuple[int, int], tuple[str, int, float]] = {
    (1, 0): ("activation", 0, math.nan),
    (3, 1): ("activation", 1, math.inf),
    (5, 0): ("gradient", 1, -math.inf),
    (7, 1): ("gradient", 0, math.nan),
}
"""(step, micro-batch) -> (where, rank, value): NaN/Inf written into a hidden state in forward (it
is then saved for backward, quantized by agoq) or into a weight's gradient in backward."""
FAULT_STEPS = 9


def nonfinite_run(rank: int, world: int, with_agoq: bool, bf16: bool) -> list[dict[str, Any]]:
    """Train with ``INJECTIONS``; per step: overflow flag, skipped steps, losses finite, gradient
    norm finite, parameters finite, parameters changed."""
    _quiet()
    engine = w.make_engine(w.ds_config(agoq=AGOQ if with_agoq else None, bf16=bf16))
    state = {"now": None}
    layer = engine.module.model.layers[0].mlp

    def on_forward(module, inputs, output):
        plan = INJECTIONS.get(state["now"])
        if plan and plan[0] == "activation" and plan[1] == rank:
            output = output.clone()
            output[0, 3, :7] = plan[2]
        return output

    def on_grad(grad: torch.Tensor) -> torch.Tensor:
        plan = INJECTIONS.get(state["now"])
        if plan and plan[0] == "gradient" and plan[1] == rank:
            grad = grad.clone()
            grad.view(-1)[11] = plan[2]
        return grad

    layer.register_forward_hook(on_forward)
    engine.module.model.layers[1].self_attn.o_proj.weight.register_hook(on_grad)
    stream = w.data_stream(rank, world)
    rows = []
    for step in range(FAULT_STEPS):
        before = [p.detach().float().clone() for p in engine.module.parameters()]
        losses = []
        for micro in range(engine.gradient_accumulation_steps()):
            state["now"] = (step, micro)
            batch = next(stream)
            loss = engine(input_ids=batch, labels=batch).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.float().item())
        state["now"] = None
        norm = engine.get_global_grad_norm()
        after = list(engine.module.parameters())
        rows.append(
            {
                "losses_finite": [math.isfinite(x) for x in losses],
                "overflow": bool(getattr(engine.optimizer, "overflow", False)),
                "skipped": int(engine.skipped_steps),
                "norm_finite": norm is not None and math.isfinite(float(norm)),
                "params_finite": all(bool(torch.isfinite(p).all()) for p in after),
                "params_changed": any(
                    not torch.equal(b, p.detach().float()) for b, p in zip(before, after, strict=True)
                ),
                "live_bytes": engine.agoq_stats().get("activation/live_bytes", 0.0) if with_agoq else 0.0,
            }
        )
    return rows


def faults_and_reference(rank: int, world: int, workdir: str, steps: int, ckpt_every: int) -> dict[str, Any]:
    """The world-2 bundle of test_faults.py: the uninterrupted reference run with its checkpoints
    (first, in a fresh process, like the runs it is compared with), non-finite injections (stock and
    agoq, fp32 and bf16), the seed control."""
    out: dict[str, Any] = {"reference": train_run(rank, world, workdir, steps, ckpt_every, tag="reference")}
    out["nonfinite"] = {}
    for bf16 in (False, True):
        key = "bf16" if bf16 else "fp32"
        out["nonfinite"][key] = {
            "stock": nonfinite_run(rank, world, False, bf16),
            "agoq": nonfinite_run(rank, world, True, bf16),
        }
    out["seeds"] = seed_control(rank, world, (AGOQ_SEED, AGOQ_SEED + 1), 2)
    return pack(out)


AGOQ_SEED = 1234
"""``agoq.seed``'s default, the seed of the reference run."""


# --- another data-parallel size ---------------------------------------------------------------------


def _fp32_partition(engine) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in engine.optimizer.single_partition_of_fp32_groups])


def _adam_moments(engine) -> torch.Tensor:
    opt = engine.optimizer.optimizer
    parts = []
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            parts += [st[k].detach().float().reshape(-1) for k in ("exp_avg", "exp_avg_sq") if k in st]
    return torch.cat(parts) if parts else torch.zeros(0)


def _module_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in state.items()}


def reshard_packed(rank: int, world: int, *args: Any) -> bytes:
    """``reshard`` for ``run_ranks`` (result packed)."""
    return pack(reshard(rank, world, *args))


def reshard(rank: int, world: int, ckpt_dir: str, tag: str, universal_tag: str, save_tag: str | None) -> dict[str, Any]:
    """Load a checkpoint saved at another data-parallel size, stock DeepSpeed and agoq side by side:
    the default load (DeepSpeed refuses), a universal checkpoint (both reshard), a module-only load;
    then train and, with ``save_tag``, save the agoq run at this size."""
    from deepspeed.runtime.zero.utils import ZeRORuntimeException

    _quiet()
    out: dict[str, Any] = {}
    saved_module = _module_state(Path(ckpt_dir) / tag / "mp_rank_00_model_states.pt")
    for name, agoq in (("stock", None), ("agoq", AGOQ)):
        res: dict[str, Any] = {}
        engine = w.make_engine(w.ds_config(agoq=agoq))
        try:
            engine.load_checkpoint(ckpt_dir, tag=tag)
            res["default_load"] = "loaded"
        except ZeRORuntimeException as exc:
            res["default_load"] = f"ZeRORuntimeException: {exc}"
        except Exception as exc:
            res["default_load"] = f"{type(exc).__name__}: {exc}"
        engine.destroy()

        engine = w.make_engine(w.ds_config(agoq=agoq, checkpoint={"load_universal": True}), seed=99)
        _, client = engine.load_checkpoint(ckpt_dir, tag=universal_tag)
        params = dict(engine.module.named_parameters())
        res["params_match"] = all(torch.equal(params[k].detach().float(), v) for k, v in saved_module.items())
        res["fp32_partition"] = _fp32_partition(engine)
        res["moments"] = _adam_moments(engine)
        res["global_steps"] = engine.global_steps
        if agoq is not None:
            state = agoq_state(engine)
            res["activation_state"] = state["model"]
            res["residual_zero"] = not _nonzero_residual(state)
            res["client_agoq_consumed"] = "agoq" not in (client or {})
        res["universal_losses"] = w.train(engine, w.data_stream(rank, world, engine.global_steps * 2), 2)
        if save_tag and agoq is not None:
            engine.save_checkpoint(ckpt_dir + f"_{world}", tag=save_tag)
        engine.destroy()

        engine = w.make_engine(w.ds_config(agoq=agoq), seed=99)
        engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=False, load_lr_scheduler_states=False)
        params = dict(engine.module.named_parameters())
        res["module_only_params_match"] = all(
            torch.equal(params[k].detach().float(), v) for k, v in saved_module.items()
        )
        res["module_only_losses"] = w.train(engine, w.data_stream(rank, world), 2)
        engine.destroy()
        out[name] = res
    return out


def resume_and_shrink(rank: int, world: int, workdir: str, steps: int, ckpt_every: int, shrink: tuple) -> dict:
    """The second world-2 bundle: resume the killed run from its last checkpoint, then load the
    4-rank checkpoint at 2 ranks (``shrink`` = ``reshard`` arguments)."""
    return pack(
        {
            "resumed": train_run(rank, world, workdir, steps, ckpt_every, resume=True, tag="resumed"),
            "shrink": reshard(rank, world, *shrink),
        }
    )


# --- the soak ---------------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def soak(rank: int, world: int, steps: int, ga: int, sample_every: int) -> dict[str, Any]:
    """``steps`` optimizer steps of ``ga`` micro-batches; after every backward: stored-activation
    bytes live; per step: gradient-buffer bytes; every ``sample_every`` steps: RSS, live tensors."""
    _quiet()
    config = w.ds_config(agoq=AGOQ, gradient_accumulation_steps=ga)
    engine = w.make_engine(config)
    quantizer = engine.agoq_activation
    opt = engine.optimizer
    stream = w.data_stream(rank, world)
    after_backward: list[int] = []
    stored_peaks: list[float] = []
    buffers: list[int] = []
    samples: list[tuple[int, int, int]] = []
    losses: list[float] = []
    t0 = time.time()
    for step in range(steps):
        for _ in range(ga):
            batch = next(stream)
            loss = engine(input_ids=batch, labels=batch).loss
            engine.backward(loss)
            losses.append(loss.item())
            del loss
            after_backward.append(int(quantizer.engine.ledger.live_stored))
            engine.step()
        stats = engine.agoq_stats()
        stored_peaks.append(stats["activation/stored_bytes_peak"])
        held = sum(a.nbytes + a.residual_nbytes for a in opt.agoq_store.accumulators())
        buffers.append(held)
        if step % sample_every == 0 or step == steps - 1:
            samples.append((step, _rss(), _live_tensors()))
    return {
        "after_backward": after_backward,
        "stored_peaks": stored_peaks,
        "stored_per_forward": stats["activation/stored_bytes_per_forward"],
        "baseline_per_forward": stats["activation/baseline_bytes_per_forward"],
        "buffers": buffers,
        "samples": samples,
        "losses": losses,
        "seconds": time.time() - t0,
    }


def soak_and_determinism(rank: int, world: int, steps: int, ga: int, sample_every: int, rerun: int) -> dict:
    """The soak, then ``rerun`` steps again with a fresh engine (same seed) and with another seed."""
    out = {"soak": soak(rank, world, steps, ga, sample_every)}
    _quiet()
    config = w.ds_config(agoq=AGOQ, gradient_accumulation_steps=ga)
    for name, seed in (("same_seed", AGOQ_SEED), ("other_seed", AGOQ_SEED + 7)):
        engine = w.make_engine({**config, "agoq": {**AGOQ, "seed": seed}})
        out[name] = w.train(engine, w.data_stream(rank, world), rerun)
        engine.destroy()
    return out


# --- script entry (the run that is killed) ------------------------------------------------------------


def main() -> None:
    """``python -m tests.reliability.rel_workers '{"fn": "train_run", "kwargs": {...}}'`` on one rank (the launcher sets
    RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."""
    spec = json.loads(sys.argv[1])
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    result = globals()[spec["fn"]](rank, world, **spec["kwargs"])
    Path(spec["result"].format(rank=rank)).write_text(json.dumps({"ok": True, "steps": sorted(result["losses"])}))


if __name__ == "__main__":
    main()
