"""A script of ``benchmarks/`` as a module, for the smoke tests that run it end to end."""

from __future__ import annotations

import importlib
from types import ModuleType


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/{name}.py``, imported as ``benchmarks.{name}`` (``benchmarks`` is a package at the
    repository root). Imported when a test runs, not when it is collected: some scripts change
    process-wide state at import (``bench_peers.py`` puts the peers of ``.peers/`` on the path)."""
    return importlib.import_module(f"benchmarks.{name}")
