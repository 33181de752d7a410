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
from setuptools.command.editable_wheel import editable_wheel

ROOT = Path(__file__).resolve().parent
AUTOLOAD_PTH = "agoq_ds_autoload.pth"


class BuildPyWithAutoload(build_py):
    """Also installs ``agoq_ds_autoload.pth`` at the site-packages root (the zero-code hook) and, in a
    wheel, a copy of ``csrc/`` as ``agoq_ds/_csrc`` for JIT builds."""

    def run(self) -> None:
        super().run()
        self.copy_file(str(ROOT / "agoq_ds" / AUTOLOAD_PTH), os.path.join(self.build_lib, AUTOLOAD_PTH))
        if not self.editable_mode:  # a wheel carries the kernel sources so JIT builds work later
            self.copy_tree(str(ROOT / "csrc"), os.path.join(self.build_lib, "agoq_ds", "_csrc"))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, AUTOLOAD_PTH)]


class _AddAutoloadPth:
    """Wraps setuptools' editable-install strategy so the editable wheel carries the .pth too."""

    def __init__(self, strategy) -> None:
        self._strategy = strategy

    def __call__(self, wheel, files, mapping) -> None:
        self._strategy(wheel, files, mapping)
        wheel.writestr(AUTOLOAD_PTH, (ROOT / "agoq_ds" / AUTOLOAD_PTH).read_bytes())

    def __enter__(self):
        self._strategy.__enter__()
        return self

    def __exit__(self, *exc):
        return self._strategy.__exit__(*exc)


class EditableWheelWithAutoload(editable_wheel):
    """``pip install -e .`` installs ``agoq_ds_autoload.pth`` as a regular install does.

    Uses setuptools' (private) strategy hook; pinned setuptools in requirements/dev.txt.
    """

    def _select_strategy(self, *args, **kwargs):
        return _AddAutoloadPth(super()._select_strategy(*args, **kwargs))


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
setup(
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithAutoload, "editable_wheel": EditableWheelWithAutoload, **ext_cmdclass},
)
