"""Ending a launched training process cleanly (the examples), and removing the shared-memory
workspaces DeepSpeed's CPU all-reduce leaves behind (test and benchmark drivers)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

SHM_DIR = Path("/dev/shm")
"""Where POSIX shared memory lives on Linux."""
CPU_ALLREDUCE_PREFIX = "deepspeed_allreduce_buffer"
"""Name prefix of the shared-memory workspace DeepSpeed's CPU all-reduce (``deepspeed/ops/csrc/cpu/
comm/shm.cpp``) creates per rank when every rank is local; DeepSpeed never unlinks it, so each run
leaves one 66 MiB file per rank in ``/dev/shm`` (RAM) until the machine restarts."""


def cpu_allreduce_buffer(rank: int) -> Path:
    """The workspace file DeepSpeed's CPU all-reduce made for ``rank`` of this job (its name carries
    the user id, ``MASTER_ADDR`` and ``MASTER_PORT``)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"{CPU_ALLREDUCE_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def remove_cpu_allreduce_buffers(since: float) -> int:
    """Unlink this user's CPU all-reduce workspaces modified at or after ``since`` (a ``time.time()``;
    for test and benchmark drivers once their ranks have exited). Processes that still map one keep
    their mapping. Returns how many were removed."""
    removed = 0
    for path in SHM_DIR.glob(f"{CPU_ALLREDUCE_PREFIX}_{os.getuid()}_*"):
        try:
            if path.stat().st_mtime >= since:
                path.unlink()
                removed += 1
        except FileNotFoundError:  # another driver removed it first
            pass
    return removed


def session_start() -> float:
    """A ``since`` for ``remove_cpu_allreduce_buffers`` taken now (file times have coarse clocks)."""
    return time.time() - 1.0


def end_distributed_run(engine: object | None) -> None:
    """Destroy ``engine``, shut the process groups down through DeepSpeed and exit the process.

    ``engine.destroy()`` removes the ZeRO gradient hooks, and ``deepspeed.comm.destroy_process_group``
    also drops DeepSpeed's own references to the groups. Even then one gloo group stays referenced
    from C++ (stock DeepSpeed too), and its threads have been seen to abort the process at
    interpreter exit ("terminate called without an active exception"). So once every rank is past
    the barrier and output is flushed, the process ends with ``os._exit(0)``. Each rank also unlinks
    the shared-memory workspace DeepSpeed's CPU all-reduce left under its name. Without a process
    group this only destroys the engine and returns.
    """
    import deepspeed.comm  # here: the clean-up helpers above serve drivers that never import DeepSpeed

    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()
    if not deepspeed.comm.is_initialized():
        return
    deepspeed.comm.barrier()
    # Every peer mapped this rank's CPU all-reduce workspace at start-up: its name can go.
    cpu_allreduce_buffer(deepspeed.comm.get_rank()).unlink(missing_ok=True)
    deepspeed.comm.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
