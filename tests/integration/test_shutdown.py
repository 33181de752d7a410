"""The /dev/shm clean-up around DeepSpeed's CPU all-reduce workspaces (``agoq_ds/testing/shutdown.py``): the
helpers name and remove exactly the files they should. That a launched example leaves none behind
is checked in ``test_launchers.py``."""

from __future__ import annotations

import os
import time

import pytest

from agoq_ds.testing.shutdown import CPU_ALLREDUCE_PREFIX, SHM_DIR, cpu_allreduce_buffer, remove_cpu_allreduce_buffers

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm")


def test_buffer_name_follows_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29512")
    assert cpu_allreduce_buffer(3).name == f"{CPU_ALLREDUCE_PREFIX}_{os.getuid()}_127.0.0.1_29512_3"


def test_only_files_since_the_start_are_removed() -> None:
    tag = f"test-{os.getpid()}"
    old = SHM_DIR / f"{CPU_ALLREDUCE_PREFIX}_{os.getuid()}_{tag}_old_0"
    new = SHM_DIR / f"{CPU_ALLREDUCE_PREFIX}_{os.getuid()}_{tag}_new_0"
    other_user = SHM_DIR / f"{CPU_ALLREDUCE_PREFIX}_{os.getuid() + 1}_{tag}_0"
    try:
        for path in (old, new, other_user):
            path.write_bytes(b"x")
        past = time.time() - 3600
        os.utime(old, (past, past))
        assert remove_cpu_allreduce_buffers(time.time() - 2) >= 1
        assert old.exists() and other_user.exists() and not new.exists()
    finally:
        for path in (old, new, other_user):
            path.unlink(missing_ok=True)
