"""Shared pytest setup: CPU DeepSpeed, quiet logs, the helper module importable; at the end, the
shared-memory workspaces DeepSpeed's CPU all-reduce left behind during the session are removed."""

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "integration"))

from agoq_ds.shutdown import remove_cpu_allreduce_buffers, session_start

_SESSION_START = session_start()


def pytest_sessionfinish(session, exitstatus) -> None:
    """Every rank the session started has exited: remove the workspaces they left in /dev/shm (66 MiB
    of RAM each, one per rank of every launcher run; enough of them stall the machine)."""
    remove_cpu_allreduce_buffers(_SESSION_START)
