"""DeepSpeed-style op builder for the CUDA quantization kernels (``csrc/cuda``).

``CUDAQuantBuilder().load()`` returns the compiled module: the one built at install time
(``agoq_ds._C.agoq_quant_cuda``) if it imports and matches this torch, else a JIT build cached in
``TORCH_EXTENSIONS_DIR``; it raises ``RuntimeError`` saying why when neither works (CPU-only torch,
no GPU, no nvcc, a compile error), so the caller can fall back to another backend.

``builder()`` gives setup.py the ``CUDAExtension`` (only possible with a CUDA build of torch).
agoq_ds/quant/builder.py loads this file by path at install time, so it uses no relative imports
and does not import agoq_ds.

Environment variables:

* ``AGOQ_DISABLE_CUDA=1``: ``load()`` refuses at once.
* ``AGOQ_CUDA_PREBUILT=0``: ignore the install-time module and JIT-build.
* ``AGOQ_CUDA_JIT=0``: never JIT-build.
* ``TORCH_CUDA_ARCH_LIST``: target architectures (DeepSpeed/torch semantics); without it an
  install-time build targets ``DEFAULT_ARCHS`` and a JIT build the visible GPUs.
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path
from types import ModuleType

from deepspeed.ops.op_builder.builder import CUDAOpBuilder

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent.parent
# A checkout has csrc/ at the top; an installed wheel carries a copy as agoq_ds/_csrc (setup.py).
CSRC_CUDA = (_ROOT / "csrc" if (_ROOT / "csrc").is_dir() else _HERE.parent / "_csrc") / "cuda"
"""Directory of the CUDA sources."""

DEFAULT_ARCHS = "8.0;8.6;9.0+PTX"
"""Install-time targets when ``TORCH_CUDA_ARCH_LIST`` is unset (Ampere, Ada via 8.6, Hopper + PTX)."""

MIN_MAJOR = 7
"""Oldest compute capability major kept (bf16 conversions are emulated below sm_80)."""

_FAST_MATH_FLAGS = ("--use_fast_math", "-use_fast_math")


def _env_flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


class CUDAQuantBuilder(CUDAOpBuilder):
    """Builds ``csrc/cuda/agoq_quant.cu`` + its binding as ``agoq_quant_cuda``."""

    BUILD_VAR = "AGOQ_BUILD_OPS"
    NAME = "agoq_quant_cuda"

    def __init__(self) -> None:
        super().__init__(name=self.NAME)
        self.how: str | None = None
        """How the last ``load()`` obtained the module ("prebuilt (...)" or "JIT-built in N s (...)")."""

    def absolute_name(self) -> str:
        """Import path of the install-time build."""
        return f"agoq_ds._C.{self.NAME}"

    def sources(self) -> list[str]:
        """Absolute paths of the CUDA and binding sources."""
        return [str(CSRC_CUDA / "agoq_quant.cu"), str(CSRC_CUDA / "agoq_quant_binding.cpp")]

    def include_paths(self) -> list[str]:
        """Absolute include directories."""
        return [str(CSRC_CUDA)]

    def cxx_args(self) -> list[str]:
        """DeepSpeed's host flags without ``-g``."""
        return [a for a in super().cxx_args() if a != "-g"]

    def nvcc_args(self) -> list[str]:
        """DeepSpeed's nvcc flags without ``--use_fast_math``, plus IEEE division and denormals.

        The kernels are bit-exact with the reference only with correctly rounded fp32 arithmetic;
        fast-math would flush denormals and approximate divisions.
        """
        args = [a for a in super().nvcc_args() if a not in _FAST_MATH_FLAGS]
        if self.build_for_cpu or self.is_rocm_pytorch():
            return args
        return [*args, "-ftz=false", "-prec-div=true", "-prec-sqrt=true"]

    def compute_capability_args(self, cross_compile_archs: str | None = None) -> list[str]:
        """``-gencode`` flags: ``TORCH_CUDA_ARCH_LIST`` if set, else ``DEFAULT_ARCHS`` (install time)."""
        if cross_compile_archs is None and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            cross_compile_archs = DEFAULT_ARCHS
        return super().compute_capability_args(cross_compile_archs)

    def filter_ccs(self, ccs: list[str]) -> list[list[str]]:
        """Drop compute capabilities older than ``MIN_MAJOR`` (not supported by current CUDA)."""
        kept = []
        for cc in ccs:
            major, minor = cc.split(".")
            if int(major) >= MIN_MAJOR:
                kept.append([major, minor])
            else:
                self.warning(f"{self.NAME}: skipping compute capability {cc} (< {MIN_MAJOR}.0)")
        return kept

    def unavailable_reason(self) -> str | None:
        """Why the CUDA kernels cannot be built or run here (``None`` when they can)."""
        import torch

        if self.is_rocm_pytorch():
            return "torch is a ROCm build; the CUDA kernels need a CUDA build of torch"
        if torch.version.cuda is None:
            return f"torch {torch.__version__} is a CPU-only build (no CUDA): the CUDA kernels cannot be built or run"
        if not torch.cuda.is_available():
            return "no GPU: torch.cuda.is_available() is False"
        return None

    def is_compatible(self, verbose: bool = False) -> bool:
        """True when torch is a CUDA build with a visible GPU (sets ``error_log`` otherwise)."""
        reason = self.unavailable_reason()
        self.error_log = reason
        if reason and verbose:
            self.warning(f"{self.NAME} is not compatible: {reason}")
        return reason is None

    def builder(self):
        """The ``CUDAExtension`` for setup.py; raises ``RuntimeError`` without a CUDA torch + nvcc."""
        import torch

        if torch.version.cuda is None:
            raise RuntimeError(f"cannot build {self.NAME}: torch {torch.__version__} is a CPU-only build")
        ext = super().builder()
        if self.build_for_cpu:
            raise RuntimeError(f"cannot build {self.NAME}: no CUDA toolkit (nvcc) found; set CUDA_HOME")
        return ext

    def load(self, verbose: bool = False) -> ModuleType:
        """Import the install-time module, else JIT-build; raise ``RuntimeError`` saying why neither worked."""
        if _env_flag("AGOQ_DISABLE_CUDA", "0"):
            raise RuntimeError("disabled by AGOQ_DISABLE_CUDA=1")
        reason = self.unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        reasons = []
        if _env_flag("AGOQ_CUDA_PREBUILT", "1"):
            try:
                module = importlib.import_module(self.absolute_name())
                _check_torch_version(module)
                self.how = f"prebuilt ({module.build_info()})"
                return module
            except (ImportError, RuntimeError) as exc:
                reasons.append(f"no usable prebuilt module ({type(exc).__name__}: {exc})")
        else:
            reasons.append("prebuilt module skipped (AGOQ_CUDA_PREBUILT=0)")
        if not _env_flag("AGOQ_CUDA_JIT", "1"):
            raise RuntimeError("; ".join([*reasons, "JIT build disabled (AGOQ_CUDA_JIT=0)"]))
        start = time.perf_counter()
        try:
            module = self.jit_load(verbose)
        except Exception as exc:
            raise RuntimeError("; ".join([*reasons, f"JIT build failed ({type(exc).__name__}: {exc})"])) from exc
        self.how = f"JIT-built in {time.perf_counter() - start:.1f} s ({module.build_info()})"
        return module


def _check_torch_version(module: ModuleType) -> None:
    """Raise ``RuntimeError`` when ``module`` was compiled against another torch major.minor."""
    import torch

    built = module.torch_version()
    running = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if built != running:
        raise RuntimeError(f"built for torch {built}, running torch {running}")
