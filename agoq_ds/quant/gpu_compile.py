"""Compile checks of the GPU kernels that need no GPU (used by the tests, CI and ``scripts/check_gpu_build.py``).

* ``compile_triton``: every Triton kernel specialisation is compiled ahead of time for a
  ``GPUTarget("cuda", arch, 32)`` (sm_80, sm_90) with ``triton.compile`` and the same options the
  launches use; the result records the PTX/cubin sizes and whether the PTX holds any FMA (it must
  not: round-to-nearest is bit-exact only without contraction).
* ``compile_cuda``: ``csrc/cuda/*.cu`` (and the binding ``.cpp``) are compiled with plain ``nvcc -c``
  against torch's headers for sm_80 + sm_90 (``CUDAExtension`` refuses a CPU-only torch; nvcc does
  not). Objects go to a temporary directory; ``cuobjdump --list-elf`` confirms the SASS targets.

Triton must be imported normally here (not under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .format import GROUP_SIZES

ROOT = Path(__file__).resolve().parent.parent.parent
CSRC_CUDA = ROOT / "csrc" / "cuda"
DEFAULT_ARCHS = (80, 90)
"""Compute capabilities checked by default: Ampere (A100) and Hopper (H100)."""

_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_FMA = re.compile(r"\bfma\.")


@dataclass
class CompileResult:
    """One compile: a Triton kernel specialisation or a CUDA source, for one or more targets."""

    kind: str
    """``"triton"`` or ``"nvcc"``."""
    name: str
    """Kernel specialisation or source file name."""
    target: str
    """``"sm_80"``, ``"sm_80+sm_90"``, ..."""
    ok: bool
    """True when the compiler produced its output."""
    seconds: float
    """Wall time of the compile."""
    detail: str = ""
    """Sizes, or the error message."""
    artifacts: dict[str, int] = field(default_factory=dict)
    """Produced outputs and their sizes in bytes (``ptx``, ``cubin``, ``object``)."""
    elf_targets: list[str] = field(default_factory=list)
    """SASS targets found in the output (cubin metadata or ``cuobjdump --list-elf``)."""
    fma_free: bool | None = None
    """Triton only: True when the PTX holds no ``fma`` instruction."""


# ----------------------------------------------------------------------------------------------
# Triton


@dataclass(frozen=True)
class TritonSpec:
    """One specialisation of a Triton kernel (the constexprs and argument types of one launch)."""

    kernel: str
    """``"quantize"`` or ``"dequantize"``."""
    bits: int
    group_size: int
    symmetric: bool
    stochastic: bool
    """Quantize only."""
    scale_dtype: torch.dtype
    io_dtype: torch.dtype
    """Input dtype (quantize) or output dtype (dequantize)."""
    index: str = "i32"
    """Triton type of ``numel``/``ngroups``: ``i32`` or ``i64`` (tensors of 2**31 elements or more)."""

    @property
    def name(self) -> str:
        """Readable identifier, e.g. ``quantize[b4,g128,sym,rtn,x=bf16,s=fp32,i32]``."""
        parts = [f"b{self.bits}", f"g{self.group_size}", "sym" if self.symmetric else "asym"]
        if self.kernel == "quantize":
            parts.append("sr" if self.stochastic else "rtn")
        io = "x" if self.kernel == "quantize" else "out"
        parts += [f"{io}={_TRITON_DTYPES[self.io_dtype]}", f"s={_TRITON_DTYPES[self.scale_dtype]}", self.index]
        return f"{self.kernel}[{','.join(parts)}]"

    def source(self):
        """The ``triton.compiler.ASTSource`` of this specialisation (pointers 16-byte aligned)."""
        from triton.compiler import ASTSource

        from . import triton_backend as tb

        scale = "*" + _TRITON_DTYPES[self.scale_dtype]
        rows = tb.rows_per_program(self.group_size, tb.BLOCK_ELEMENTS)
        common = {"BITS": self.bits, "GROUP": self.group_size, "ROWS": rows, "SYMMETRIC": self.symmetric}
        if self.kernel == "quantize":
            fn = tb._quantize_kernel
            codes = "*i8" if self.bits == 8 and self.symmetric else "*u8"
            signature = {
                "x_ptr": "*" + _TRITON_DTYPES[self.io_dtype],
                "codes_ptr": codes,
                "scales_ptr": scale,
                "zeros_ptr": scale if self.symmetric else "*fp32",
                "numel": self.index,
                "ngroups": self.index,
                "seed": "i64",
            }
            constexprs = {
                **common,
                "STOCHASTIC": self.stochastic,
                "BF16_SCALE": self.scale_dtype == torch.bfloat16,
            }
        else:
            fn = tb._dequantize_kernel
            codes = "*i8" if self.bits == 8 and self.symmetric else "*u8"
            signature = {
                "codes_ptr": codes,
                "scales_ptr": scale,
                "zeros_ptr": scale if self.symmetric else "*fp32",
                "out_ptr": "*" + _TRITON_DTYPES[self.io_dtype],
                "numel": self.index,
                "ngroups": self.index,
            }
            constexprs = {**common, "BF16_OUT": self.io_dtype == torch.bfloat16}
        signature.update(dict.fromkeys(constexprs, "constexpr"))
        aligned = [i for i, v in enumerate(signature.values()) if v.startswith("*")]
        attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
        return ASTSource(fn, signature, constexprs, attrs)


def triton_specs(full: bool = False) -> list[TritonSpec]:
    """Kernel specialisations to compile.

    The default set (18) covers every (kernel, bits, symmetric) pair, both rounding modes, both
    scale dtypes, all three input/output dtypes, 64-bit indexing and the smallest, a middle and the
    largest group size. ``full=True`` gives the whole product of those choices.
    """
    dts = (torch.float32, torch.bfloat16, torch.float16)
    specs: list[TritonSpec] = []
    if full:
        for bits in (2, 4, 8):
            for io in dts:
                for group in (GROUP_SIZES[0], 128, GROUP_SIZES[-1]):
                    for sr in (False, True):
                        for sd in (torch.float32, torch.bfloat16):
                            specs.append(TritonSpec("quantize", bits, group, True, sr, sd, io))
                        specs.append(TritonSpec("quantize", bits, group, False, sr, torch.float32, io))
                    for sd in (torch.float32, torch.bfloat16):
                        specs.append(TritonSpec("dequantize", bits, group, True, False, sd, io))
                    specs.append(TritonSpec("dequantize", bits, group, False, False, torch.float32, io))
        return specs
    groups = (GROUP_SIZES[0], 128, GROUP_SIZES[-1])
    for k, bits in enumerate((2, 4, 8)):
        g = groups[k]
        specs += [
            TritonSpec("quantize", bits, g, True, False, torch.float32, dts[k % 3]),
            TritonSpec("quantize", bits, 128, True, True, torch.bfloat16, dts[(k + 1) % 3]),
            TritonSpec("quantize", bits, g, False, False, torch.float32, dts[(k + 2) % 3], "i64" if k == 2 else "i32"),
            TritonSpec("quantize", bits, 128, False, True, torch.float32, dts[k % 3]),
            TritonSpec(
                "dequantize", bits, g, True, False, torch.bfloat16 if k != 1 else torch.float32, dts[(k + 1) % 3]
            ),
            TritonSpec(
                "dequantize", bits, g, False, False, torch.float32, dts[(k + 2) % 3], "i64" if k == 0 else "i32"
            ),
        ]
    return specs


def _require_compiled_triton() -> None:
    from . import triton_backend as tb

    if tb.interpret_mode():
        raise RuntimeError("TRITON_INTERPRET is set: kernels are interpreted, not compiled; unset it to compile")


@contextlib.contextmanager
def _triton_cache(cache_dir: str | None) -> Iterator[None]:
    """Point Triton's cache at ``cache_dir`` for the duration (``None``: leave it alone)."""
    if cache_dir is None:
        yield
        return
    old = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = old


def compile_triton(spec: TritonSpec, arch: int, cache_dir: str | None = None) -> CompileResult:
    """Compile one specialisation for ``sm_<arch>`` with no GPU present."""
    import triton
    from triton.backends.compiler import GPUTarget

    from . import triton_backend as tb

    _require_compiled_triton()
    start = time.perf_counter()
    try:
        with _triton_cache(cache_dir):
            kernel = triton.compile(spec.source(), target=GPUTarget("cuda", arch, 32), options=tb.COMPILE_OPTIONS)
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}".strip().splitlines()
        return CompileResult(
            "triton", spec.name, f"sm_{arch}", False, time.perf_counter() - start, " | ".join(msg[-5:])
        )
    seconds = time.perf_counter() - start
    asm = kernel.asm
    artifacts = {k: len(asm[k]) for k in ("ptx", "cubin") if asm.get(k)}
    ptx = asm.get("ptx", "")
    target = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE)
    ok = artifacts.get("ptx", 0) > 0 and artifacts.get("cubin", 0) > 0
    detail = ", ".join(f"{k} {v} B" for k, v in artifacts.items())
    return CompileResult(
        "triton",
        spec.name,
        f"sm_{arch}",
        ok,
        seconds,
        detail,
        artifacts,
        [target.group(1)] if target else [],
        fma_free=not _FMA.search(ptx),
    )


def compile_triton_all(
    archs: tuple[int, ...] = DEFAULT_ARCHS,
    full: bool = False,
    cache_dir: str | None = None,
    on_result: Callable[[CompileResult], None] | None = None,
) -> list[CompileResult]:
    """Compile every spec of ``triton_specs(full)`` for every arch; ``on_result`` sees each as it finishes."""
    results = []
    for arch in archs:
        for spec in triton_specs(full):
            res = compile_triton(spec, arch, cache_dir)
            if on_result is not None:
                on_result(res)
            results.append(res)
    return results


# ----------------------------------------------------------------------------------------------
# nvcc


def find_nvcc() -> str | None:
    """Path of ``nvcc``: ``$CUDA_HOME/bin``, ``PATH``, then ``/usr/local/cuda*/bin`` (None if absent)."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    which = shutil.which("nvcc")
    if which:
        candidates.append(which)
    candidates.append("/usr/local/cuda/bin/nvcc")
    candidates += sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), reverse=True)
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def find_cuobjdump(nvcc: str | None = None) -> str | None:
    """``cuobjdump`` next to nvcc, on ``PATH``, or the copy bundled with Triton (None if absent)."""
    candidates = []
    if nvcc:
        candidates.append(os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cuobjdump"))
    if shutil.which("cuobjdump"):
        candidates.append(shutil.which("cuobjdump"))
    with contextlib.suppress(ImportError):
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def nvcc_version(nvcc: str) -> str:
    """``release X.Y`` of ``nvcc --version``."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else "unknown"


def cuda_sources() -> list[Path]:
    """The CUDA sources and their binding: ``csrc/cuda/*.cu`` and ``csrc/cuda/*.cpp``."""
    return sorted(CSRC_CUDA.glob("*.cu")) + sorted(CSRC_CUDA.glob("*.cpp"))


def nvcc_command(nvcc: str, source: Path, output: Path, archs: tuple[int, ...] = DEFAULT_ARCHS) -> list[str]:
    """The ``nvcc -c`` command line for ``source``, mirroring torch's ``CUDAExtension`` flags.

    ``-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE``: a CPU-only torch ships no ``cuda_cmake_macros.h`` (it only
    sets Windows DLL macros); ``-O1`` on the binding keeps the check fast.
    """
    from torch.utils.cpp_extension import include_paths

    cmd = [nvcc, "-c", str(source), "-o", str(output), "-std=c++20", "-Xcompiler", "-fPIC"]
    cmd += [f"-I{p}" for p in include_paths()]
    cmd += [f"-I{CSRC_CUDA}", f"-I{sysconfig.get_paths()['include']}"]
    cmd += [
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-DTORCH_EXTENSION_NAME=agoq_quant_cuda",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
    ]
    if source.suffix == ".cu":
        cmd += [
            "-O3",
            "-D__CUDA_NO_HALF_OPERATORS__",
            "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-D__CUDA_NO_HALF2_OPERATORS__",
            "--expt-relaxed-constexpr",
            "-ftz=false",
            "-prec-div=true",
            "-prec-sqrt=true",
        ]
        for arch in archs:
            cmd.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    else:
        cmd.append("-O1")
    return cmd


def cuda_ptx(arch: int = DEFAULT_ARCHS[0], timeout: float = 600.0) -> CompileResult:
    """Compile ``agoq_quant.cu`` to PTX for ``compute_<arch>`` and check it holds no ``fma`` instruction.

    The kernels use explicitly rounded intrinsics, so any FMA would be an unintended contraction that
    breaks bit-exactness with the reference (IEEE division is one ``div.rn.f32`` at the PTX level).
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (looked in $CUDA_HOME/bin, PATH, /usr/local/cuda*/bin)")
    src = CSRC_CUDA / "agoq_quant.cu"
    with tempfile.TemporaryDirectory(prefix="agoq_ptx_") as tmp:
        out = Path(tmp) / "agoq_quant.ptx"
        cmd = [a for a in nvcc_command(nvcc, src, out, ()) if a not in ("-c", "-Xcompiler", "-fPIC")]
        cmd += ["-ptx", f"-arch=compute_{arch}"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        seconds = time.perf_counter() - start
        if proc.returncode != 0 or not out.is_file():
            log = (proc.stdout + proc.stderr).strip().splitlines()
            return CompileResult("nvcc", src.name + " (ptx)", f"compute_{arch}", False, seconds, "\n".join(log[-20:]))
        ptx = out.read_text()
    entries = len(re.findall(r"^(?:\.visible\s+)?\.entry\s", ptx, re.MULTILINE))
    fma = len(_FMA.findall(ptx))
    detail = f"ptx {len(ptx)} B, {entries} kernels, {fma} fma"
    return CompileResult(
        "nvcc",
        src.name + " (ptx)",
        f"compute_{arch}",
        entries > 0,
        seconds,
        detail,
        {"ptx": len(ptx)},
        fma_free=fma == 0,
    )


def list_elf(obj: Path, cuobjdump: str | None) -> list[str]:
    """SASS targets (``sm_80``, ...) embedded in an object file; empty when cuobjdump is missing."""
    if cuobjdump is None:
        return []
    out = subprocess.run([cuobjdump, "--list-elf", str(obj)], capture_output=True, text=True, check=False).stdout
    return sorted(set(re.findall(r"\.(sm_\d+a?)\.cubin", out)))


def compile_cuda(
    archs: tuple[int, ...] = DEFAULT_ARCHS,
    out_dir: str | None = None,
    sources: list[Path] | None = None,
    jobs: int = 2,
    timeout: float = 900.0,
) -> list[CompileResult]:
    """Compile the CUDA sources with ``nvcc -c`` (``jobs`` in parallel); raises ``FileNotFoundError`` without nvcc."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (looked in $CUDA_HOME/bin, PATH, /usr/local/cuda*/bin)")
    cuobjdump = find_cuobjdump(nvcc)
    sources = cuda_sources() if sources is None else sources
    target = "+".join(f"sm_{a}" for a in archs)
    with contextlib.ExitStack() as stack:
        if out_dir is None:
            out_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="agoq_nvcc_"))
        pending = list(sources)
        running: list[tuple[Path, Path, subprocess.Popen, float, Path]] = []
        results: list[CompileResult] = []
        while pending or running:
            while pending and len(running) < max(1, jobs):
                src = pending.pop(0)
                obj = Path(out_dir) / (src.name + ".o")
                log_path = Path(out_dir) / (src.name + ".log")
                with open(log_path, "w") as log_file:
                    proc = subprocess.Popen(
                        nvcc_command(nvcc, src, obj, archs), stdout=log_file, stderr=subprocess.STDOUT, text=True
                    )
                running.append((src, obj, proc, time.perf_counter(), log_path))
            time.sleep(0.1)
            for item in list(running):
                src, obj, proc, start, log_path = item
                if proc.poll() is None and time.perf_counter() - start < timeout:
                    continue
                running.remove(item)
                timed_out = proc.poll() is None
                if timed_out:
                    proc.kill()
                    proc.wait()
                seconds = time.perf_counter() - start
                log = log_path.read_text(errors="replace")
                if timed_out:
                    log = f"timed out after {timeout:.0f} s\n{log}"
                ok = proc.returncode == 0 and obj.is_file() and not timed_out
                artifacts = {"object": obj.stat().st_size} if obj.is_file() else {}
                elf = list_elf(obj, cuobjdump) if ok and src.suffix == ".cu" else []
                detail = f"object {artifacts.get('object', 0)} B" if ok else "\n".join(log.strip().splitlines()[-20:])
                kind = target if src.suffix == ".cu" else "host"
                results.append(CompileResult("nvcc", src.name, kind, ok, seconds, detail, artifacts, elf))
        return sorted(results, key=lambda r: r.name)
