"""``agoq-ds`` command line (also ``python -m agoq_ds``): report, schema, plan."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _autoload_state() -> str:
    pth = [Path(p) / "agoq_ds_autoload.pth" for p in sys.path if p.endswith("site-packages")]
    installed = any(p.is_file() for p in pth)
    if os.environ.get("AGOQ_DS_AUTOLOAD", "1") == "0":
        return "disabled by AGOQ_DS_AUTOLOAD=0"
    import deepspeed  # noqa: F401  (the hook patches on import)

    from .deepspeed.integration import is_patched

    patched = is_patched()
    where = ".pth installed" if installed else ".pth NOT installed (use agoq_ds.initialize or import agoq_ds)"
    return f"{where}; deepspeed.initialize {'patched' if patched else 'NOT patched'}"


def report(_: argparse.Namespace) -> int:
    """Print versions, the DeepSpeed accelerator, and which kernel backend each op uses."""
    import torch
    from deepspeed.accelerator import get_accelerator
    from rich.console import Console
    from rich.table import Table

    from . import quant

    console = Console()
    versions = Table(title="agoq-ds report", show_header=False)
    for name, value in [
        ("agoq-ds", _version("agoq-ds")),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
        ("deepspeed", _version("deepspeed")),
        ("transformers", _version("transformers")),
        ("accelerate", _version("accelerate")),
        ("triton", _version("triton")),
        (
            "DeepSpeed accelerator",
            f"{get_accelerator()._name} (comm backend {get_accelerator().communication_backend_name()})",
        ),
        ("GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else "none"),
        ("zero-code hook", _autoload_state()),
    ]:
        versions.add_row(name, value)
    console.print(versions)

    backends = Table(title="quantization kernel backends")
    for col in ("backend", "devices", "available", "detail"):
        backends.add_column(col)
    for st in quant.all_status():
        backends.add_row(st.name, ",".join(st.device_types), "yes" if st.available else "no", st.detail)
    console.print(backends)

    ops = Table(title=f"op -> backend ({quant.backends.preferred()}; auto: measured, agoq_ds/quant/autotune.py)")
    for col in ("op", "bits", "device", "backend"):
        ops.add_column(col)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for op in ("quantize", "dequantize"):
        for bits in (2, 4, 8):
            for dev in devices:
                ops.add_row(f"agoq::{op}", str(bits), dev, quant.select(torch.device(dev), op, bits))
    console.print(ops)
    from .deepspeed.contract import DEEPSPEED_VERSION, FENCES, FOREIGN, check

    problems = check()
    listed = sum(len(f.overrides) + len(f.helpers) + len(f.state) for f in FENCES) + len(FOREIGN)
    console.print(
        f"DeepSpeed internals agoq relies on ({listed}, written against {DEEPSPEED_VERSION}): "
        + ("all present" if not problems else "CHANGED:\n  " + "\n  ".join(problems))
    )
    return 0


def schema(args: argparse.Namespace) -> int:
    """Print (or write) the JSON Schema of the ``"agoq"`` block."""
    from .config import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``agoq-ds``."""
    parser = argparse.ArgumentParser(prog="agoq-ds", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("report", help="versions, accelerator, kernel backends").set_defaults(func=report)
    p = sub.add_parser("schema", help="JSON Schema of the agoq config block")
    p.add_argument("--out", help="write to this file instead of stdout")
    p.set_defaults(func=schema)
    try:
        from .planner import add_plan_command
    except ImportError:
        pass
    else:
        add_plan_command(sub)
        from .gpu_cost import add_cost_command

        add_cost_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``agoq-ds`` console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
