"""A minimal multi-process launcher that behaves like torchrun / the ``deepspeed`` launcher when a
worker dies: once one rank exits abnormally, the others get a grace period and are then killed.

    codes = launch(2, {"fn": "train_run", "kwargs": {...}, "result": "/tmp/x/result_{rank}.json"})

Each rank runs ``python -m tests.reliability.rel_workers '<json spec>'`` from the repository root,
with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set, so a test can SIGKILL a rank for
real (``run_ranks`` processes report exceptions, they are not killed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from agoq_ds.testing.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
"""The repository root: the ranks' working directory, where ``tests`` is importable."""


def launch(world: int, spec: dict, timeout: float = 600.0, grace: float = 15.0) -> list[int]:
    """Run ``spec`` on ``world`` ranks; returns each rank's exit code (negative: killed by that signal).
    Ranks still alive ``grace`` seconds after another one failed are SIGKILLed, as a launcher does."""
    port = free_port()
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["OMP_NUM_THREADS"] = "1"
    procs = []
    for rank in range(world):
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
        rank_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = open(Path(spec["result"].format(rank=rank)).with_suffix(".log"), "w")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.reliability.rel_workers", json.dumps(spec)],
                cwd=ROOT,
                env=rank_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    deadline = time.time() + timeout
    failed_at = None
    while any(p.poll() is None for p in procs):
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = time.time()
        if (failed_at is not None and time.time() - failed_at > grace) or time.time() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
        time.sleep(0.2)
    return [p.wait() for p in procs]
