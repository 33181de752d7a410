"""Shared pytest setup: CPU DeepSpeed; at the end, the shared-memory workspaces DeepSpeed's CPU
all-reduce left behind during the session are removed.

``tests`` and its folders are packages: pytest imports each test module by its dotted name from the
repository root (``tests.gradient.test_stage3``), so helpers are imported the same way
(``from tests.gradient.grad_workers import world2``) and shared code comes from ``agoq_ds.testing``.
"""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from agoq_ds.testing.shutdown import remove_cpu_allreduce_buffers, session_start

_SESSION_START = session_start()


def pytest_sessionfinish(session, exitstatus) -> None:
    """Every rank the session started has exited: remove the workspaces they left in /dev/shm (66 MiB
    of RAM each, one per rank of every launcher run; enough of them stall the machine)."""
    remove_cpu_allreduce_buffers(_SESSION_START)
