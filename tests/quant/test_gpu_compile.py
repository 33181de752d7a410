"""GPU code compiles without a GPU: Triton kernels for sm_80/sm_90, the CUDA sources with nvcc.

Plus the CUDA backend and op builder behave sensibly on a machine that cannot run them.
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from agoq_ds.quant import gpu_compile

ARCHS = (80, 90)
SPECS = gpu_compile.triton_specs()


@pytest.fixture(scope="module")
def triton_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh Triton cache, so every kernel is really compiled."""
    return str(tmp_path_factory.mktemp("triton_cache"))


def test_specs_cover_every_kernel_variant() -> None:
    kinds = {(s.kernel, s.bits, s.symmetric) for s in SPECS}
    assert kinds == {(k, b, sym) for k in ("quantize", "dequantize") for b in (2, 4, 8) for sym in (True, False)}
    quant = [s for s in SPECS if s.kernel == "quantize"]
    assert {s.stochastic for s in quant} == {False, True}
    assert {s.scale_dtype for s in SPECS} == {torch.float32, torch.bfloat16}
    assert {s.io_dtype for s in quant} == {torch.float32, torch.bfloat16, torch.float16}
    assert {s.io_dtype for s in SPECS if s.kernel == "dequantize"} == {torch.float32, torch.bfloat16, torch.float16}
    assert {s.index for s in SPECS} == {"i32", "i64"}
    assert {s.group_size for s in SPECS} >= {32, 4096}
    assert len({s.name for s in SPECS}) == len(SPECS)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_triton_kernel_compiles(spec: gpu_compile.TritonSpec, arch: int, triton_cache: str) -> None:
    pytest.importorskip("triton")
    res = gpu_compile.compile_triton(spec, arch, cache_dir=triton_cache)
    assert res.ok, res.detail
    assert res.artifacts["ptx"] > 1000 and res.artifacts["cubin"] > 1000
    assert res.elf_targets and re.fullmatch(rf"sm_{arch}a?", res.elf_targets[0]), res.elf_targets
    # Round-to-nearest is bit-exact only if no multiply/add pair was contracted.
    assert res.fma_free, f"{spec.name}: PTX contains fma"


def test_fma_check_has_power(triton_cache: str) -> None:
    """With fusion enabled the same kernel does contain FMAs: the check above can fail."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    spec = gpu_compile.TritonSpec("dequantize", 4, 128, False, False, torch.float32, torch.float32)
    with gpu_compile._triton_cache(triton_cache):
        kernel = triton.compile(spec.source(), target=GPUTarget("cuda", 80, 32), options={"enable_fp_fusion": True})
    assert re.search(r"\bfma\.", kernel.asm["ptx"])


def test_compile_reports_errors(triton_cache: str) -> None:
    """A broken specialisation yields ok=False with the compiler's message, not an exception."""
    pytest.importorskip("triton")
    bad = gpu_compile.TritonSpec("quantize", 4, 48, True, False, torch.float32, torch.float32)  # 48: not a power of 2
    res = gpu_compile.compile_triton(bad, 80, cache_dir=triton_cache)
    assert not res.ok and res.detail


@pytest.mark.slow
def test_nvcc_compiles_cuda_sources(tmp_path: Path) -> None:
    if gpu_compile.find_nvcc() is None:
        pytest.skip("nvcc not found ($CUDA_HOME/bin, PATH, /usr/local/cuda*/bin): CUDA compile check skipped")
    results = gpu_compile.compile_cuda(ARCHS, out_dir=str(tmp_path), jobs=2)
    names = {r.name for r in results}
    assert {"agoq_quant.cu", "agoq_quant_binding.cpp"} <= names
    for r in results:
        assert r.ok, f"{r.name}:\n{r.detail}"
        assert r.artifacts["object"] > 0
    cu = next(r for r in results if r.name == "agoq_quant.cu")
    if gpu_compile.find_cuobjdump(gpu_compile.find_nvcc()) is not None:
        assert cu.elf_targets == ["sm_80", "sm_90"]


@pytest.mark.slow
def test_cuda_ptx_has_every_kernel_and_no_fma() -> None:
    if gpu_compile.find_nvcc() is None:
        pytest.skip("nvcc not found: CUDA PTX check skipped")
    res = gpu_compile.cuda_ptx(80)
    assert res.ok, res.detail
    # {quantize, dequantize} x {fp32, fp16, bf16} x bits {2, 4, 8} x {symmetric, asymmetric}
    assert "36 kernels" in res.detail, res.detail
    assert res.fma_free, res.detail


def test_nvcc_reports_compile_errors(tmp_path: Path) -> None:
    if gpu_compile.find_nvcc() is None:
        pytest.skip("nvcc not found")
    broken = tmp_path / "broken.cu"
    broken.write_text("__global__ void k(float* x) { x[0] = undefined_name; }\n")
    (res,) = gpu_compile.compile_cuda(ARCHS, out_dir=str(tmp_path), sources=[broken])
    assert not res.ok and "undefined_name" in res.detail


def test_nvcc_command_targets() -> None:
    cmd = gpu_compile.nvcc_command("nvcc", gpu_compile.CSRC_CUDA / "agoq_quant.cu", Path("x.o"), ARCHS)
    assert "-gencode=arch=compute_80,code=sm_80" in cmd and "-gencode=arch=compute_90,code=sm_90" in cmd
    assert "--use_fast_math" not in cmd and "-ftz=false" in cmd
    assert any(a.endswith("torch/include") for a in cmd)


# ----------------------------------------------------------------------------------------------
# CUDA backend and builder on a machine without CUDA


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_backend_says_why() -> None:
    from agoq_ds.quant import backends, cuda_backend

    reason = cuda_backend.unavailable_reason()
    assert reason
    if torch.version.cuda is None:
        assert "CPU-only" in reason
    else:
        assert "no GPU" in reason
    st = backends.status("cuda")
    assert not st.available and st.detail == reason
    with pytest.raises(RuntimeError, match="unavailable"):
        cuda_backend.quantize(torch.zeros(4), 8, 32, True, False, 0, torch.float32)


def _load_builder_by_path():
    """As setup.py loads agoq_ds/quant/builder.py at install time: no package import."""
    path = Path(gpu_compile.__file__).with_name("builder.py")
    return SimpleNamespace(**runpy.run_path(str(path), run_name="_agoq_cuda_builder_test"))


def test_cuda_builder_sources_and_names() -> None:
    module = _load_builder_by_path()
    b = module.CUDAQuantBuilder()
    assert b.NAME == "agoq_quant_cuda" and b.absolute_name() == "agoq_ds._C.agoq_quant_cuda"
    for src in b.sources() + b.include_paths():
        assert Path(src).is_absolute() and Path(src).exists(), src
    assert {Path(s).suffix for s in b.sources()} == {".cu", ".cpp"}


@pytest.mark.skipif(torch.version.cuda is not None, reason="torch has CUDA")
def test_cuda_builder_refuses_cpu_torch() -> None:
    b = _load_builder_by_path().CUDAQuantBuilder()
    assert not b.is_compatible()
    with pytest.raises(RuntimeError, match="CPU-only"):
        b.builder()
    with pytest.raises(RuntimeError, match="CPU-only"):
        b.load()


def test_cuda_builder_nvcc_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """No fast-math, IEEE division/denormals, DEFAULT_ARCHS when TORCH_CUDA_ARCH_LIST is unset."""
    import deepspeed.ops.op_builder.builder as ds_builder

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "")  # DeepSpeed writes it: restore afterwards
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(ds_builder, "installed_cuda_version", lambda name="": (12, 8))
    monkeypatch.setattr(ds_builder.OpBuilder, "is_rocm_pytorch", staticmethod(lambda: False))
    b = _load_builder_by_path().CUDAQuantBuilder()
    b.build_for_cpu = False
    args = b.nvcc_args()
    assert "--use_fast_math" not in args
    assert {"-ftz=false", "-prec-div=true"} <= set(args)
    gencode = [a for a in args if a.startswith("-gencode")]
    assert gencode == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_86,code=sm_86",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "6.0;9.0")
    gencode = [a for a in b.nvcc_args() if a.startswith("-gencode")]
    assert gencode == ["-gencode=arch=compute_90,code=sm_90"]
