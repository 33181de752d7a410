"""``kernel_backend: "auto"``: the fastest backend per op and bit-width, measured on this machine.

The first time a device type with more than one compiled backend (CUDA and Triton on a GPU; the
pure-torch reference never competes) needs a backend, each of them quantizes and dequantizes one
probe tensor (bf16, groups of 128, symmetric; 64M elements on a GPU) at 2, 4 and 8 bits, each timed
over batches of back-to-back calls (``time_per_call``); the fastest per ``(op, bits)`` is used from
then on. The table is cached in a JSON file per machine (device name,
torch and Triton versions), so the other ranks and later runs read it instead of measuring, and
every process of a run picks the same kernels (their stochastic-rounding draws differ).

``AGOQ_KERNEL_AUTOTUNE=0`` skips measuring (backends in their fixed preference order);
``AGOQ_CACHE_DIR`` moves the cache (default ``~/.cache/agoq_ds``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

OPS = ("quantize", "dequantize")
"""The ops a table covers."""
BITS = (2, 4, 8)
"""The widths a table covers."""
PROBE_NUMEL = {"cuda": 1 << 26, "cpu": 1 << 20}
"""Elements of the probe tensor per device type (large enough to time bandwidth, not launches)."""
REPEATS = 5
"""Timed batches per backend, op and width after one warm-up call; the fastest counts (a busy machine
only ever slows a call down)."""
CALLS_PER_BATCH = 20
"""Calls timed back to back as one batch: a GPU kernel of 10-60 us timed alone carries 10-25 us of
launch latency and host synchronisation, which decided the choice more than the kernel did."""
METHOD = 2
"""Version of the timing method, stored with the cached table; a table measured otherwise (1: one call
between two synchronisations, a 16M-element probe) is measured again."""


def enabled() -> bool:
    """Whether ``auto`` measures (``AGOQ_KERNEL_AUTOTUNE`` is not ``0``)."""
    return os.environ.get("AGOQ_KERNEL_AUTOTUNE", "1") != "0"


def cache_path(device: torch.device) -> Path:
    """The cache file of this machine's ``device`` type."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    key = f"{device.type}|{name}|torch {torch.__version__}|triton {triton_version}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(os.environ.get("AGOQ_CACHE_DIR", Path.home() / ".cache" / "agoq_ds"))
    return root / f"kernels-{device.type}-{digest}.json"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_per_call(
    fn: Callable[[], object], device: torch.device, *, repeats: int | None = None, calls: int | None = None
) -> float:
    """Seconds per call of ``fn`` on ``device``: after one warm-up call, ``repeats`` batches of ``calls``
    back-to-back calls, each batch timed as a whole (CUDA events on a GPU, so the host never waits
    between calls); the fastest batch over its number of calls."""
    repeats = REPEATS if repeats is None else repeats
    calls = CALLS_PER_BATCH if calls is None else calls
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            begin = time.perf_counter()
            for _ in range(calls):
                fn()
            elapsed = time.perf_counter() - begin
        best = min(best, elapsed / calls)
    return best


def measure(device: torch.device, candidates: dict[str, ModuleType]) -> dict[str, dict]:
    """Seconds per call of each backend, op and width on ``device``: ``{"quantize/4": {name: s}}``."""
    x = torch.randn(PROBE_NUMEL.get(device.type, 1 << 20), device=device, dtype=torch.bfloat16)
    table: dict[str, dict] = {}
    for bits in BITS:
        for name, impl in candidates.items():

            def quantize(impl=impl, bits=bits):
                return impl.quantize(x, bits, 128, True, False, 0, torch.bfloat16)

            codes, scales, _ = quantize()

            def dequantize(impl=impl, bits=bits, codes=codes, scales=scales):
                return impl.dequantize(codes, scales, None, bits, 128, x.numel(), x.dtype)

            table.setdefault(f"quantize/{bits}", {})[name] = time_per_call(quantize, device)
            table.setdefault(f"dequantize/{bits}", {})[name] = time_per_call(dequantize, device)
    return table


def choices(device: torch.device, candidates: dict[str, ModuleType]) -> dict[str, str]:
    """The fastest backend per ``"op/bits"`` on ``device`` among ``candidates``: from the cache when it
    lists exactly these candidates, else measured now and cached. Processes that ask at once take
    turns (a file lock), so the first measures and the others read its table: all agree."""
    path = cache_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_suffix(".lock")):
        try:
            cached = json.loads(path.read_text())
            if sorted(cached.get("candidates", [])) == sorted(candidates) and cached.get("method") == METHOD:
                return cached["choices"]
        except (OSError, ValueError, KeyError):
            pass
        seconds = measure(device, candidates)
        picked = {key: min(times, key=times.get) for key, times in seconds.items()}
        record = {
            "candidates": sorted(candidates),
            "choices": picked,
            "seconds": seconds,
            "probe_numel": PROBE_NUMEL,
            "method": METHOD,
            "calls_per_batch": CALLS_PER_BATCH,
        }
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
        return picked


@contextlib.contextmanager
def _locked(path: Path):
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): processes may measure side by side
        yield
        return
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
