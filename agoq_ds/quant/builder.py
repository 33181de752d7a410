"""DeepSpeed-style op builder for the C++ CPU quantization kernels (``csrc/cpu``), plus the setup.py hooks.

``CPUQuantBuilder().load()`` returns the compiled module: the one built at install time
(``agoq_ds._C.agoq_quant_cpu``) if it imports, matches this torch's major.minor and, in a source
checkout, was built from the current ``csrc/cpu`` (a stale editable build is not used); else a JIT
build cached in ``TORCH_EXTENSIONS_DIR``. It raises ``RuntimeError`` when neither works (e.g. a
wheel install, which ships no ``csrc``, without its prebuilt module), so the caller can fall back
to the pure-torch reference. Builds use ``-march=native``, like DeepSpeed's CPU ops: a prebuilt
module is for the machine that built it.

setup.py imports this file by path (not as part of the package), so it uses no relative imports.

Environment variables:

* ``AGOQ_DISABLE_CPP=1``: ``load()`` refuses at once (forces the pure-torch fallback).
* ``AGOQ_CPP_PREBUILT=0``: ignore the install-time module and JIT-build.
* ``AGOQ_CPP_JIT=0``: never JIT-build (only the install-time module is used).
* ``AGOQ_BUILD_CUDA=1``: at install time, build the CUDA kernels even without a visible GPU
  (needs a CUDA build of torch).
* ``TORCH_EXTENSIONS_DIR``: where JIT builds are cached (torch's variable).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import time
from pathlib import Path
from types import ModuleType

from deepspeed.ops.op_builder.cpu.builder import CPUOpBuilder

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent.parent
# A checkout has csrc/ at the top; an installed wheel carries a copy as agoq_ds/_csrc (setup.py).
_CSRC = _ROOT / "csrc" if (_ROOT / "csrc").is_dir() else _HERE.parent / "_csrc"
_CSRC_CPU = _CSRC / "cpu"


def _env_flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


class CPUQuantBuilder(CPUOpBuilder):
    """Builds ``csrc/cpu/agoq_quant.cpp`` with OpenMP and the host's SIMD flags (``-march=native``)."""

    BUILD_VAR = "AGOQ_BUILD_OPS"
    NAME = "agoq_quant_cpu"

    def __init__(self) -> None:
        super().__init__(name=self.NAME)
        self.how: str | None = None
        """How the last ``load()`` obtained the module ("prebuilt (...)" or "JIT-built in N s (...)")."""

    def absolute_name(self) -> str:
        """Import path of the install-time build."""
        return f"agoq_ds._C.{self.NAME}"

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

    def load(self, verbose: bool = False) -> ModuleType:
        """Import the install-time module, else JIT-build; raise ``RuntimeError`` saying why neither worked."""
        if _env_flag("AGOQ_DISABLE_CPP", "0"):
            raise RuntimeError("disabled by AGOQ_DISABLE_CPP=1")
        reasons = []
        if _env_flag("AGOQ_CPP_PREBUILT", "1"):
            try:
                module = importlib.import_module(self.absolute_name())
                _check_prebuilt(module)
                self.how = f"prebuilt ({module.build_info()})"
                return module
            except (ImportError, AttributeError, RuntimeError) as exc:  # missing, foreign or stale build
                reasons.append(f"no usable prebuilt module ({type(exc).__name__}: {exc})")
        else:
            reasons.append("prebuilt module skipped (AGOQ_CPP_PREBUILT=0)")
        if not _env_flag("AGOQ_CPP_JIT", "1"):
            raise RuntimeError("; ".join([*reasons, "JIT build disabled (AGOQ_CPP_JIT=0)"]))
        start = time.perf_counter()
        try:
            module = self.jit_load(verbose)
        except Exception as exc:
            raise RuntimeError("; ".join([*reasons, f"JIT build failed ({type(exc).__name__}: {exc})"])) from exc
        self.how = f"JIT-built in {time.perf_counter() - start:.1f} s ({module.build_info()})"
        return module


def source_hash() -> str:
    """Short hash of the C++ sources in ``csrc/cpu`` ("" when they are not shipped)."""
    digest = hashlib.sha256()
    files = sorted(_CSRC_CPU.glob("*.cpp")) + sorted(_CSRC_CPU.glob("*.h")) if _CSRC_CPU.is_dir() else []
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16] if files else ""


def _check_prebuilt(module: ModuleType) -> None:
    """Raise ``RuntimeError`` when ``module`` was built for another torch or from other sources."""
    import torch

    built = module.torch_version()
    running = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if built != running:
        raise RuntimeError(f"built for torch {built}, running torch {running}")
    current = source_hash()
    if current and module.source_hash() != f"h{current}":
        raise RuntimeError("stale: csrc/cpu changed since it was built (reinstall to rebuild)")


def _want_cuda() -> bool:
    import torch

    return bool(torch.version.cuda) and (torch.cuda.is_available() or _env_flag("AGOQ_BUILD_CUDA", "0"))


def _cuda_extension():
    """The CUDA extension from ``cuda_builder.py`` (loaded by path), or None if that file is absent."""
    path = _HERE / "cuda_builder.py"
    if not path.exists():
        print("[agoq-ds] cuda_builder.py not found: skipping the CUDA kernels")
        return None
    spec = importlib.util.spec_from_file_location("_agoq_cuda_builder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CUDAQuantBuilder().builder()


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
            cuda_ext = _cuda_extension()
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
