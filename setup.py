"""Build script: compiles the quantization kernels in csrc/ at install time and ships the autoload hook.

Install with ``pip install --no-build-isolation .`` (or ``-e .``) so the build sees the torch you
already have. ``AGOQ_BUILD_OPS=0`` skips the kernel build (they are then JIT-built on first use, or
the pure-torch reference is used).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
AUTOLOAD_PTH = "agoq_ds_autoload.pth"


class BuildPyWithAutoload(build_py):
    """Also installs ``agoq_ds_autoload.pth`` at the site-packages root (the zero-code hook)."""

    def run(self) -> None:
        super().run()
        self.copy_file(str(ROOT / "agoq_ds" / AUTOLOAD_PTH), os.path.join(self.build_lib, AUTOLOAD_PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, AUTOLOAD_PTH)]


def _load_builders():
    """Import agoq_ds/quant/builder.py by path (importing the package would import DeepSpeed twice)."""
    spec = importlib.util.spec_from_file_location("_agoq_builder", ROOT / "agoq_ds" / "quant" / "builder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions() -> tuple[list, dict]:
    if os.environ.get("AGOQ_BUILD_OPS", "1") == "0":
        return [], {}
    builders = _load_builders()
    return builders.install_time_extensions(), builders.build_ext_cmdclass()


ext_modules, ext_cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithAutoload, **ext_cmdclass})
