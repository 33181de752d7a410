"""DeepSpeed-style op builders of the compiled quantization kernels, plus the setup.py hooks.

One base, ``QuantOpBuilder``, holds what both devices share: the module names, and ``load()``, which
returns the compiled module: the one built at install time (``agoq_ds._C.<NAME>``) if it imports
and matches this torch's major.minor (and, for the CPU, was built from the current ``csrc/cpu``: a
stale editable build is not used); else a JIT build cached in ``TORCH_EXTENSIONS_DIR``. It raises
``RuntimeError`` saying why when neither works (a wheel install without its prebuilt module; a
CPU-only torch, no GPU, no nvcc, a compile error for CUDA), so the caller can fall back to another
backend. Per device:

* ``CPUQuantBuilder`` (``csrc/cpu``, ``agoq_quant_cpu``): OpenMP and ``-march=native``, like
  DeepSpeed's CPU ops (a prebuilt module is for the machine that built it).
* ``CUDAQuantBuilder`` (``csrc/cuda``, ``agoq_quant_cuda``): no fast-math; ``DEFAULT_ARCHS`` at
  install time unless ``TORCH_CUDA_ARCH_LIST`` is set, the visible GPUs for a JIT build.

``native.NativeLoader`` calls ``load()`` once per process. setup.py imports this file by path (not as
part of the package), so it uses no relative imports and does not import agoq_ds.

Environment variables (``<DEV>``: ``CPP`` or ``CUDA``):

* ``AGOQ_DISABLE_<DEV>=1``: ``load()`` refuses at once (forces the fallback).
* ``AGOQ_<DEV>_PREBUILT=0``: ignore the install-time module and JIT-build.
* ``AGOQ_<DEV>_JIT=0``: never JIT-build (only the install-time module is used).
* ``AGOQ_BUILD_CUDA=1``: at install time, build the CUDA kernels even without a visible GPU
  (needs a CUDA build of torch).
* ``TORCH_CUDA_ARCH_LIST``: CUDA target architectures (DeepSpeed/torch semantics).
* ``TORCH_EXTENSIONS_DIR``: where JIT builds are cached (torch's variable).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import time
from pathlib import Path
from types import ModuleType

from deepspeed.ops.op_builder.builder import CUDAOpBuilder
from deepspeed.ops.op_builder.cpu.builder import CPUOpBuilder

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent.parent
# A checkout has csrc/ at the top; an installed wheel carries a copy as agoq_ds/_csrc (setup.py).
_CSRC = _ROOT / "csrc" if (_ROOT / "csrc").is_dir() else _HERE.parent / "_csrc"
_CSRC_CPU = _CSRC / "cpu"
CSRC_CUDA = _CSRC / "cuda"
"""Directory of the CUDA sources."""

DEFAULT_ARCHS = "8.0;8.6;9.0+PTX"
"""CUDA install-time targets when ``TORCH_CUDA_ARCH_LIST`` is unset (Ampere, Ada via 8.6, Hopper + PTX)."""

MIN_MAJOR = 7
"""Oldest compute capability major kept (bf16 conversions are emulated below sm_80)."""

_FAST_MATH_FLAGS = ("--use_fast_math", "-use_fast_math")


def _env_flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


class QuantOpBuilder:
    """What the CPU and CUDA builders share: names, and ``load()`` (prebuilt, else JIT).

    A subclass sets ``NAME`` (the module) and ``ENV`` (``CPP``/``CUDA``: its environment variables),
    and may override ``unavailable_reason`` (checked before anything is loaded) and
    ``check_prebuilt`` (raise ``RuntimeError`` for a foreign or stale install-time module).
    """

    BUILD_VAR = "AGOQ_BUILD_OPS"
    NAME = ""
    ENV = ""

    def __init__(self) -> None:
        super().__init__(name=self.NAME)
        self.how: str | None = None
        """How the last ``load()`` obtained the module ("prebuilt (...)" or "JIT-built in N s (...)")."""

    def absolute_name(self) -> str:
        """Import path of the install-time build."""
        return f"agoq_ds._C.{self.NAME}"

    def unavailable_reason(self) -> str | None:
        """Why the kernels cannot be built or run here (``None`` when they may be)."""
        return None

    def check_prebuilt(self, module: ModuleType) -> None:
        """Raise ``RuntimeError`` when ``module`` was compiled against another torch major.minor."""
        _check_torch_version(module)

    def load(self, verbose: bool = False) -> ModuleType:
        """Import the install-time module, else JIT-build; raise ``RuntimeError`` saying why neither worked."""
        env = self.ENV
        if _env_flag(f"AGOQ_DISABLE_{env}", "0"):
            raise RuntimeError(f"disabled by AGOQ_DISABLE_{env}=1")
        reason = self.unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        reasons = []
        if _env_flag(f"AGOQ_{env}_PREBUILT", "1"):
            try:
                module = importlib.import_module(self.absolute_name())
                self.check_prebuilt(module)
                self.how = f"prebuilt ({module.build_info()})"
                return module
            except (ImportError, AttributeError, RuntimeError) as exc:  # missing, foreign or stale build
                reasons.append(f"no usable prebuilt module ({type(exc).__name__}: {exc})")
        else:
            reasons.append(f"prebuilt module skipped (AGOQ_{env}_PREBUILT=0)")
        if not _env_flag(f"AGOQ_{env}_JIT", "1"):
            raise RuntimeError("; ".join([*reasons, f"JIT build disabled (AGOQ_{env}_JIT=0)"]))
        start = time.perf_counter()
        try:
            module = self.jit_load(verbose)
        except Exception as exc:
            raise RuntimeError("; ".join([*reasons, f"JIT build failed ({type(exc).__name__}: {exc})"])) from exc
        self.how = f"JIT-built in {time.perf_counter() - start:.1f} s ({module.build_info()})"
        return module


class CPUQuantBuilder(QuantOpBuilder, CPUOpBuilder):
    """Builds ``csrc/cpu/agoq_quant.cpp`` with OpenMP and the host's SIMD flags (``-march=native``)."""

    NAME = "agoq_quant_cpu"
    ENV = "CPP"

    def sources(self) -> list[str]:
        """Absolute paths of the C++ sources."""
        return [str(_CSRC_CPU / "agoq_quant.cpp")]

    def include_paths(self) -> list[str]:
        """Absolute include directories."""
        return [str(_CSRC_CPU)]

    def cxx_args(self) -> list[str]:
        """DeepSpeed's CPU flags (-O3, -march, -fopenmp, SIMD macro) without -g, plus strict fp contraction.

        ``-ffp-contract=off`` keeps ``q * s + z`` two roundings, as in the reference; fast-math is
        never used (it breaks NaN propagation and bit-exactness). The sources' hash is compiled in,
        so a build older than the sources is detected (and a JIT build redone when a header changes).
        """
        flags = [a for a in super().cxx_args() if a != "-g"]
        return [*flags, "-ffp-contract=off", f"-DAGOQ_SOURCE_HASH=h{source_hash()}"]

    def extra_ldflags(self) -> list[str]:
        """Link libgomp (resolved at run time to the copy torch already loaded)."""
        return ["-fopenmp"]

    def builder(self):
        """The ``CppExtension`` for install-time builds (DeepSpeed's flags, plus the OpenMP link flag).

        setuptools insists on source paths relative to setup.py (it runs from the repository root).
        """
        from torch.utils.cpp_extension import CppExtension

        return CppExtension(
            name=self.absolute_name(),
            sources=[os.path.relpath(s, _ROOT) for s in self.sources()],
            include_dirs=self.include_paths(),
            extra_compile_args={"cxx": self.strip_empty_entries(self.cxx_args())},
            extra_link_args=self.extra_ldflags(),
        )

    def check_prebuilt(self, module: ModuleType) -> None:
        """Another torch, or sources changed since the build: not used."""
        _check_prebuilt(module)


class CUDAQuantBuilder(QuantOpBuilder, CUDAOpBuilder):
    """Builds ``csrc/cuda/agoq_quant.cu`` + its binding as ``agoq_quant_cuda``."""

    NAME = "agoq_quant_cuda"
    ENV = "CUDA"

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


def source_hash() -> str:
    """Short hash of the C++ sources in ``csrc/cpu`` ("" when they are not shipped)."""
    digest = hashlib.sha256()
    files = sorted(_CSRC_CPU.glob("*.cpp")) + sorted(_CSRC_CPU.glob("*.h")) if _CSRC_CPU.is_dir() else []
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16] if files else ""


def _check_torch_version(module: ModuleType) -> None:
    """Raise ``RuntimeError`` when ``module`` was compiled against another torch major.minor."""
    import torch

    built = module.torch_version()
    running = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if built != running:
        raise RuntimeError(f"built for torch {built}, running torch {running}")


def _check_prebuilt(module: ModuleType) -> None:
    """Raise ``RuntimeError`` when ``module`` was built for another torch or from other sources."""
    _check_torch_version(module)
    current = source_hash()
    if current and module.source_hash() != f"h{current}":
        raise RuntimeError("stale: csrc/cpu changed since it was built (reinstall to rebuild)")


def _want_cuda() -> bool:
    import torch

    return bool(torch.version.cuda) and (torch.cuda.is_available() or _env_flag("AGOQ_BUILD_CUDA", "0"))


def _relative_sources(ext):
    """``ext`` with sources under the repository made relative (setuptools rejects absolute paths)."""
    ext.sources = [
        os.path.relpath(s, _ROOT) if Path(s).is_absolute() and Path(s).is_relative_to(_ROOT) else s for s in ext.sources
    ]
    return ext


def install_time_extensions() -> list:
    """Extensions setup.py compiles: the CPU kernels, and the CUDA kernels when torch has CUDA."""
    extensions = [CPUQuantBuilder().builder()]
    if _want_cuda():
        try:
            cuda_ext = CUDAQuantBuilder().builder()
        except Exception as exc:  # a broken CUDA setup must not block the CPU build
            print(f"[agoq-ds] WARNING: skipping the CUDA kernels ({type(exc).__name__}: {exc})")
            cuda_ext = None
        if cuda_ext is not None:
            extensions.append(_relative_sources(cuda_ext))
    return extensions


def build_ext_cmdclass() -> dict:
    """``{"build_ext": torch's BuildExtension}`` (ninja when available)."""
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension}
