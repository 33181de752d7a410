"""Zero-code activation: patch DeepSpeed right after it is first imported.

Loaded at interpreter start by ``agoq_ds_autoload.pth`` (installed next to site-packages). It only
registers a ``sys.meta_path`` finder (duck-typed, so not even ``importlib.abc`` is imported) — no
torch or DeepSpeed import, so start-up stays cheap (about 1 ms). When
``deepspeed`` actually executes (a bare ``find_spec`` probe, as transformers does, does not count),
``agoq_ds.deepspeed.integration.patch_deepspeed`` wraps ``deepspeed.initialize`` so that a config with an
``"agoq"`` block gets the AGoQ engine.

Set ``AGOQ_DS_AUTOLOAD=0`` to switch this off (``agoq_ds.initialize`` still works explicitly).
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

from agoq_ds.constants import AUTOLOAD_ENV


class _PatchAfterExec:
    """Wraps DeepSpeed's own loader; patches the module once it has executed."""

    def __init__(self, loader: object) -> None:
        self._loader = loader

    def create_module(self, spec: object) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        _uninstall()
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        from agoq_ds.deepspeed.integration import patch_deepspeed

        patch_deepspeed(module)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class DeepSpeedImportHook:
    """Finds ``deepspeed`` with the other finders and hands back its spec with a patching loader.

    Another finder of the same kind (a profiler's or a test harness's post-import hook) asks every
    finder, this one included, while this one is asking it: the search is not reentrant, so the
    inner call answers None instead of recursing forever.
    """

    def __init__(self) -> None:
        self._searching = False

    def find_spec(self, fullname, path, target=None):
        if fullname != "deepspeed" or self._searching:
            return None
        self._searching = True
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None and not isinstance(spec.loader, _PatchAfterExec):
                        spec.loader = _PatchAfterExec(spec.loader)
                    return spec
            return None
        finally:
            self._searching = False


_hook = DeepSpeedImportHook()


def _uninstall() -> None:
    if _hook in sys.meta_path:
        sys.meta_path.remove(_hook)


def install() -> None:
    """Register the hook (or patch at once if DeepSpeed is already imported)."""
    if os.environ.get(AUTOLOAD_ENV, "1") == "0":
        return
    if sys.modules.get("deepspeed") is not None:  # None: an import of deepspeed is blocked, not done
        from agoq_ds.deepspeed.integration import patch_deepspeed

        patch_deepspeed(sys.modules["deepspeed"])
    elif _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)


install()
