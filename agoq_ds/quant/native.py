"""The one loader of the compiled (C++ and CUDA) kernels: ``NativeLoader``, one per device.

A loader obtains its extension module once per process (thread-safe) from its builder
(``builder.CPUQuantBuilder`` / ``builder.CUDAQuantBuilder``): the install-time build if usable,
else a JIT build (see ``builder.QuantOpBuilder.load``). Loading the module registers its
dispatcher kernels (``TORCH_LIBRARY_IMPL``); if it fails, the backend reports itself unavailable
with the builder's reason, and the registry falls back to another backend.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import ModuleType


class NativeLoader:
    """Loads one compiled extension on first use and remembers how (or why not)."""

    def __init__(self, label: str, builder: Callable[[], object]) -> None:
        self.label = label
        """Name in messages, e.g. ``"C++"``, ``"CUDA"``."""
        self._builder = builder
        self._lock = threading.Lock()
        self._module: ModuleType | None = None
        self._reason: str | None = None
        self._how = ""
        self._tried = False

    def _load(self) -> None:
        with self._lock:
            if self._tried:
                return
            try:
                builder = self._builder()
                self._module = builder.load()
                self._how = builder.how or ""
            except Exception as exc:
                self._reason = str(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
            self._tried = True

    def kernels(self) -> ModuleType:
        """The extension module; raises ``RuntimeError`` saying why it is unavailable."""
        if self._module is None:
            self._load()
            if self._module is None:
                raise RuntimeError(f"{self.label} quantization kernels unavailable: {self._reason}")
        return self._module

    def unavailable_reason(self) -> str | None:
        """Why the kernels cannot be used here (``None`` when they can); loads them on first call."""
        self._load()
        return None if self._module is not None else self._reason

    def describe(self) -> str:
        """How the kernels were obtained, e.g. ``"prebuilt (AVX-512, OpenMP)"`` or ``"JIT-built in 41.0 s (...)"``."""
        self._load()
        return self._how if self._module is not None else f"unavailable: {self._reason}"
