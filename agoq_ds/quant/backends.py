"""Registry of quantization kernel backends, and ``Kernels``: the choice among them, per engine.

Each backend implements the same two functions as ``reference.py`` (``quantize``/``dequantize``
with identical arguments and results) and registers its ops with the dispatcher when it loads (see
``ops.py``). Backends load lazily: importing agoq_ds never compiles or imports Triton.
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


class Kernels:
    """Which backend runs each quantization op: one engine's ``kernel_backend`` choice, as an object.

    ``Kernels("auto")`` picks per device, op and width (the measured table of ``autotune``, else the
    first available backend); ``Kernels("triton")`` (``cuda``, ``cpp``, ``torch``) uses that backend
    on the devices it supports and the automatic choice elsewhere. Building one for a backend that
    cannot run here raises ``BackendUnavailable``. An engine holds one and passes it down
    (``quantize(..., kernels=k)``, ``dequantize(q, kernels=k)``, the fused ops); code that passes
    nothing uses the process default (``default_kernels()``, set by ``set_preferred``). Two engines
    with different choices in one process do not affect each other.
    """

    def __init__(self, choice: str = "auto") -> None:
        if choice != "auto" and choice not in _MODULES:
            raise ValueError(f"kernel backend {choice!r}: must be auto or one of {', '.join(BACKEND_NAMES)}")
        if choice != "auto":
            get(choice)
        self.choice = choice
        """``auto`` or a backend name."""
        self._selected: dict[tuple[str, str, int], str] = {}

    def __repr__(self) -> str:
        return f"Kernels({self.choice!r})"

    def select(self, device: torch.device, op: str = "quantize", bits: int = 8) -> str:
        """Name of the backend that runs ``op`` (``quantize``/``dequantize``) at ``bits`` on ``device``
        (loads it, so that its dispatcher kernels are registered)."""
        key = (device.type, op, bits)
        name = self._selected.get(key)
        if name is None:
            name = self._selected[key] = _select(self.choice, device, op, bits)
        return name

    def compiled(self, device_type: str) -> str:
        """The backend under ``torch.compile`` (no measuring, no loading while tracing): the chosen one
        where it runs, else ``"dispatcher"`` (the device's registered kernel of ``agoq::quantize``)."""
        choice = self.choice
        if choice != "auto" and device_type in _DEVICE_TYPES[choice]:
            return choice
        return "dispatcher"

    # The ops with this choice (see ops.py / fused.py for their contracts).

    def quantize(self, x: torch.Tensor, bits: int = 8, group_size: int = 128, **kwargs):
        """``quant.quantize(x, bits, group_size, ..., kernels=self)``."""
        from .ops import quantize

        return quantize(x, bits, group_size, kernels=self, **kwargs)

    def dequantize(self, q, *, flat: bool = False) -> torch.Tensor:
        """``quant.dequantize(q, kernels=self)``."""
        from .ops import dequantize

        return dequantize(q, kernels=self, flat=flat)

    def dequantize_add_(self, out: torch.Tensor, q) -> torch.Tensor:
        """``fused.dequantize_add_(out, q, kernels=self)``."""
        from .fused import dequantize_add_

        return dequantize_add_(out, q, kernels=self)

    def requantize_add_(self, codes: torch.Tensor, scales: torch.Tensor, addend: torch.Tensor, **kwargs) -> None:
        """``fused.requantize_add_(codes, scales, addend, ..., kernels=self)``."""
        from .fused import requantize_add_

        requantize_add_(codes, scales, addend, kernels=self, **kwargs)


_default = Kernels("auto")
_kernels: dict[str, Kernels] = {"auto": _default}


def kernels_for(choice: str) -> Kernels:
    """The shared ``Kernels`` of ``choice`` (built once per process; raises ``BackendUnavailable``
    when ``choice`` cannot run here)."""
    k = _kernels.get(choice)
    if k is None:
        k = _kernels.setdefault(choice, Kernels(choice))
    return k


def default_kernels() -> Kernels:
    """The process default: what ``quantize``/``dequantize`` use when given no ``kernels``."""
    return _default


def set_preferred(name: str) -> None:
    """Set the process default choice (``auto`` restores automatic choice); engines pass their own
    ``Kernels`` and are not affected.

    Raises ``BackendUnavailable`` at once when ``name`` cannot run in this process.
    """
    global _default
    _default = kernels_for(name)


def preferred() -> str:
    """The process default choice (``auto`` or a backend name)."""
    return default_kernels().choice


def select(device: torch.device, op: str = "quantize", bits: int = 8) -> str:
    """Name of the backend the process default runs ``op`` at ``bits`` on ``device`` with."""
    return default_kernels().select(device, op, bits)


def _select(choice: str, device: torch.device, op: str, bits: int) -> str:
    if choice != "auto" and device.type in _DEVICE_TYPES[choice]:
        return choice
    # The pure-torch reference is the fallback and the correctness baseline, not a speed contender:
    # compiled kernels are measured against each other (CUDA against Triton on a GPU).
    candidates = [n for n in BACKEND_NAMES[:-1] if device.type in _DEVICE_TYPES[n] and status(n).available]
    if not candidates:
        return "torch"
    if len(candidates) == 1 or not autotune.enabled():
        return candidates[0]
    table = _measured.get(device.type)
    if table is None:
        table = _measured.setdefault(device.type, autotune.choices(device, {n: get(n) for n in candidates}))
    return table.get(f"{op}/{bits}", candidates[0])
