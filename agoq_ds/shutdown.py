"""Ending a launched training process cleanly (used by the examples)."""

from __future__ import annotations

import os
import sys

import deepspeed.comm


def end_distributed_run(engine: object | None) -> None:
    """Destroy ``engine``, shut the process groups down through DeepSpeed and exit the process.

    ``engine.destroy()`` removes the ZeRO gradient hooks, and ``deepspeed.comm.destroy_process_group``
    also drops DeepSpeed's own references to the groups. Even then one gloo group stays referenced
    from C++ (stock DeepSpeed too), and its threads have been seen to abort the process at
    interpreter exit ("terminate called without an active exception"). So once every rank is past
    the barrier and output is flushed, the process ends with ``os._exit(0)``. Without a process group
    this only destroys the engine and returns.
    """
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()
    if not deepspeed.comm.is_initialized():
        return
    deepspeed.comm.barrier()
    deepspeed.comm.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
