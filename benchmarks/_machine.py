"""Where and when a benchmark ran (date, CPU, core count, load average, library versions, git commit),
and which code: ``snapshot`` freezes a commit's ``agoq_ds`` for long runs in a shared checkout.

Every result file of ``benchmarks/convergence.py`` and ``benchmarks/memory.py`` carries this block so
that each figure in ``docs/results.md`` can name the machine and the moment it came from.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent


def cpu_isa() -> dict[str, bool]:
    """What the CPU offers the kernels compared here: AVX2, AVX-512 (agoq's C++ loops), and native
    bf16 (AVX512_BF16 or AMX: torch's bf16 matmul runs through oneDNN; without it, a slow fallback)."""
    try:
        flags = next(
            (
                line.split(":", 1)[1].split()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("flags")
            ),
            [],
        )
    except OSError:
        flags = []
    return {
        "avx2": "avx2" in flags,
        "avx512": "avx512f" in flags and "avx512bw" in flags,
        "native_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
    }


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def agoq_origin() -> str:
    """Where ``import agoq_ds`` resolves in this environment (a snapshot on ``PYTHONPATH`` or the checkout)."""
    import importlib.util

    spec = importlib.util.find_spec("agoq_ds")
    return str(Path(spec.origin).parent) if spec and spec.origin else "not importable"


def machine_info() -> dict:
    """Date, machine and software versions, for a result file's ``"machine"`` block."""
    from agoq_ds.quant.autotune import cpu_model

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "cpu_isa": cpu_isa(),
        "platform": platform.platform(),
        "load_average": load_average(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("torch", "deepspeed", "transformers", "agoq-ds")},
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "agoq_ds": agoq_origin(),
    }


def describe(machine: dict) -> str:
    """One line for docs: date, cores, CPU model and instruction sets, load averages."""
    load = machine.get("load_average", [])
    load_s = ", ".join(f"{x:.2f}" for x in load) if load else "n/a"
    isa = machine.get("cpu_isa", {})
    isa_s = ", ".join(k for k, v in isa.items() if v and k != "native_bf16") or "no AVX2"
    bf16 = "native bf16" if isa.get("native_bf16") else "no native bf16"
    return f"{machine['date']} · {machine['nproc']} cores · {machine['cpu']} ({isa_s}; {bf16}) · load average {load_s}"


def snapshot(rev: str = "HEAD") -> tuple[Path, str]:
    """``git archive`` of ``rev``'s ``agoq_ds``, ``csrc`` and ``examples`` in a temporary directory (plus
    the C++ kernels built in this checkout), so that edits to the checkout during a long run cannot
    reach it. Returns (directory, commit)."""
    commit = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, check=True)
    commit_id = commit.stdout.strip()
    dest = Path(tempfile.gettempdir()) / "agoq_ds_snapshots" / commit_id[:12]
    if not (dest / "agoq_ds").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "archive", commit_id, "agoq_ds", "csrc", "examples"], cwd=ROOT, capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
        for built in (ROOT / "agoq_ds" / "_C").glob("*.so"):  # same csrc/ as HEAD, else agoq JIT-builds
            shutil.copy2(built, dest / "agoq_ds" / "_C" / built.name)
    return dest, commit_id


SNAPSHOT_ENV = "AGOQ_BENCH_SNAPSHOT"
"""Set (to the commit) in a benchmark process that ``reexec_in_snapshot`` started."""


def reexec_in_snapshot(script: str, argv: list[str], rev: str = "HEAD") -> NoReturn:
    """Start ``script argv`` again with ``rev``'s snapshot first on ``PYTHONPATH``, so that this process
    and every rank it spawns import the snapshot's ``agoq_ds`` (the autoload hook included)."""
    dest, commit = snapshot(rev)
    env = {**os.environ, SNAPSHOT_ENV: commit}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(dest), env.get("PYTHONPATH")]))
    os.execve(sys.executable, [sys.executable, script, *argv], env)


def write_results(result: dict, out: Path, plot: Callable[[dict, Path], None] | None) -> None:
    """Write ``result`` as JSON to ``out`` and, with ``plot``, a chart next to it (``.png``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    if plot is not None:
        png = out.with_suffix(".png")
        plot(result, png)
        print(f"wrote {png}")
