#!/usr/bin/env python
"""CI check that the GPU kernels compile, on a machine without a GPU.

Compiles every Triton kernel specialisation for each target (``triton.compile`` + ``GPUTarget``)
and the CUDA sources with ``nvcc -c`` against torch's headers, then prints what compiled for which
target. Exit status 1 if anything failed (or nvcc is missing with ``--require-nvcc``).

    python scripts/check_gpu_build.py                 # sm_80 + sm_90, default kernel set, nvcc
    python scripts/check_gpu_build.py --full --arch 80 86 90 --no-nvcc
    python scripts/check_gpu_build.py --json report.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default: 80 90)")
    p.add_argument("--full", action="store_true", help="every Triton specialisation, not the covering subset")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    p.add_argument("--no-nvcc", action="store_true", help="skip the nvcc compile of csrc/cuda")
    p.add_argument("--no-ptx", action="store_true", help="skip the PTX (FMA-free) check of agoq_quant.cu")
    p.add_argument("--require-nvcc", action="store_true", help="fail (instead of skipping) when nvcc is missing")
    p.add_argument("--jobs", type=int, default=2, help="parallel nvcc processes (default 2)")
    p.add_argument("--keep", metavar="DIR", help="keep the nvcc objects in DIR")
    p.add_argument("--json", metavar="FILE", help="also write all results as JSON")
    return p.parse_args(argv)


def _line(res) -> str:
    status = "ok  " if res.ok else "FAIL"
    extra = f" [{', '.join(res.elf_targets)}]" if res.elf_targets else ""
    if res.fma_free is False:
        extra += " [contains fma]"
    detail = res.detail if res.ok else res.detail.replace("\n", "\n        ")
    return f"{status} {res.target:<12} {res.seconds:6.2f} s  {res.name}{extra}  {detail}"


def main(argv: list[str] | None = None) -> int:
    """Run the checks; returns the exit status."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("TRITON_INTERPRET is set: unset it (kernels would be interpreted, not compiled)", file=sys.stderr)
        return 2
    from agoq_ds.quant import gpu_compile

    archs = tuple(args.arch)
    results = []
    failed = False
    if not args.no_triton:
        import triton

        specs = gpu_compile.triton_specs(args.full)
        print(f"== Triton {triton.__version__}: {len(specs)} specialisations x {len(archs)} targets")
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="agoq_triton_cache_") as cache:
            res = gpu_compile.compile_triton_all(
                archs, args.full, cache, on_result=lambda r: print(_line(r), flush=True)
            )
        results += res
        bad = [r for r in res if not r.ok or r.fma_free is False]
        failed |= bool(bad)
        print(f"-- Triton: {len(res) - len(bad)}/{len(res)} ok in {time.perf_counter() - start:.1f} s")
    if not args.no_nvcc:
        nvcc = gpu_compile.find_nvcc()
        if nvcc is None:
            print("== nvcc: not found ($CUDA_HOME/bin, PATH, /usr/local/cuda*/bin): CUDA compile check skipped")
            failed |= args.require_nvcc
        else:
            print(f"== nvcc {gpu_compile.nvcc_version(nvcc)} ({nvcc}): {', '.join(f'sm_{a}' for a in archs)}")
            start = time.perf_counter()
            if args.keep:
                Path(args.keep).mkdir(parents=True, exist_ok=True)
            res = gpu_compile.compile_cuda(archs, out_dir=args.keep, jobs=args.jobs)
            for r in res:
                print(_line(r), flush=True)
            want = sorted(f"sm_{a}" for a in archs)
            missing = [r for r in res if r.ok and r.target != "host" and r.elf_targets and r.elf_targets != want]
            for r in missing:
                print(f"FAIL {r.name}: SASS for {r.elf_targets}, expected {want}")
            if not args.no_ptx:
                ptx = gpu_compile.cuda_ptx(archs[0])
                print(_line(ptx), flush=True)
                res.append(ptx)
            results += res
            failed |= any(not r.ok or r.fma_free is False for r in res) or bool(missing)
            print(f"-- nvcc: {sum(r.ok for r in res)}/{len(res)} ok in {time.perf_counter() - start:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    print("FAILED" if failed else "ALL OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
