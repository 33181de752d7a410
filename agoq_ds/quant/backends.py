"""Registry of quantization kernel backends and the rule that picks one per device.

Each backend implements the same two functions as ``reference.py`` (``quantize``/``dequantize``
with identical arguments and results). Backends load lazily: importing agoq_ds never compiles or
imports Triton.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from types import ModuleType

import torch

from . import autotune

BACKEND_NAMES = ("cuda", "triton", "cpp", "torch")
"""Every backend, in preference order (``auto`` measures among the available ones, see ``autotune``;
without measuring, the first available one is used)."""

_MODULES = {
    "torch": "agoq_ds.quant.reference",
    "cpp": "agoq_ds.quant.cpp_backend",
    "triton": "agoq_ds.quant.triton_backend",
    "cuda": "agoq_ds.quant.cuda_backend",
}
_DEVICE_TYPES = {"torch": ("cpu", "cuda"), "cpp": ("cpu",), "triton": ("cuda",), "cuda": ("cuda",)}


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here, and why not if it cannot."""

    name: str
    """Backend name."""
    available: bool
    """True when its kernels are loaded (or loadable) in this process."""
    detail: str
    """How it was loaded (prebuilt, JIT, ...) or why it is unavailable."""
    device_types: tuple[str, ...]
    """Device types whose tensors it accepts."""


class BackendUnavailable(RuntimeError):
    """A backend was requested explicitly but cannot run here."""


_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}
_failed: dict[str, str] = {}
_preferred = "auto"
_selected: dict[tuple[str, str, int], str] = {}
"""``select``'s answer per (device type, op, bits) (it is asked on every call); cleared by ``set_preferred``."""
_measured: dict[str, dict[str, str]] = {}
"""``autotune.choices`` per device type (``auto``: the fastest backend per op and width)."""


def _load(name: str) -> ModuleType | None:
    with _lock:
        if name in _loaded:
            return _loaded[name]
        if name in _failed:
            return None
        try:
            module = importlib.import_module(_MODULES[name])
            reason = module.unavailable_reason() if hasattr(module, "unavailable_reason") else None
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
        if reason:
            _failed[name] = reason
            return None
        _loaded[name] = module
        return module


def status(name: str) -> BackendStatus:
    """Load ``name`` if needed and report whether it is usable."""
    if name not in _MODULES:
        raise ValueError(f"backend={name!r}: must be one of {', '.join(BACKEND_NAMES)}")
    module = _load(name)
    if module is None:
        return BackendStatus(name, False, _failed[name], _DEVICE_TYPES[name])
    detail = module.describe() if hasattr(module, "describe") else "pure torch"
    return BackendStatus(name, True, detail, _DEVICE_TYPES[name])


def all_status() -> list[BackendStatus]:
    """Status of every backend, in preference order."""
    return [status(n) for n in BACKEND_NAMES]


def get(name: str) -> ModuleType:
    """The module implementing backend ``name``; raises ``BackendUnavailable`` with the reason."""
    module = _loaded.get(name)
    if module is not None:
        return module
    st = status(name)
    if not st.available:
        raise BackendUnavailable(f"kernel backend {name!r} is not available: {st.detail}")
    return _loaded[name]


def set_preferred(name: str) -> None:
    """Set the backend used for devices it supports (``auto`` restores automatic choice).

    Raises ``BackendUnavailable`` at once when ``name`` cannot run in this process.
    """
    global _preferred
    if name != "auto":
        get(name)
    _preferred = name
    _selected.clear()


def preferred() -> str:
    """The current preference (``auto`` or a backend name)."""
    return _preferred


def select(device: torch.device, op: str = "quantize", bits: int = 8) -> str:
    """Name of the backend that will run ``op`` (``quantize``/``dequantize``) at ``bits`` on ``device``."""
    key = (device.type, op, bits)
    name = _selected.get(key)
    if name is None:
        name = _selected[key] = _select(device, op, bits)
    return name


def _select(device: torch.device, op: str, bits: int) -> str:
    if _preferred != "auto" and device.type in _DEVICE_TYPES[_preferred]:
        return _preferred
    # The pure-torch reference is the fallback and the correctness baseline, not a speed contender:
    # compiled kernels are measured against each other (CUDA against Triton on a GPU).
    candidates = [n for n in BACKEND_NAMES[:-1] if device.type in _DEVICE_TYPES[n] and status(n).available]
    if not candidates:
        return "torch"
    if len(candidates) == 1 or not autotune.enabled():
        return candidates[0]
    table = _measured.get(device.type)
    if table is None:
        table = _measured[device.type] = autotune.choices(device, {n: get(n) for n in candidates})
    return table.get(f"{op}/{bits}", candidates[0])
