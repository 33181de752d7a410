"""``deepspeed.comm`` for the gradient core, imported on first use, so that the core
(``collectives``, ``allreduce``, ``accumulator``, ``accounting``, ``host``, ``store``, ``paths``,
``check``) imports without DeepSpeed.

A module writes ``dist = deepspeed_comm(globals())`` where it wrote ``from deepspeed import comm as
dist``. The first attribute read (``dist.get_rank``, ...) imports ``deepspeed.comm`` and rebinds the
module's global ``dist`` to it, so every later call is the same global and attribute lookup as
before, without a stand-in in between.
"""

from __future__ import annotations

import importlib
from typing import Any

MODULE = "deepspeed.comm"


class LazyComm:
    """Stands in for ``deepspeed.comm`` in one module's globals until its first use."""

    def __init__(self, namespace: dict[str, Any], name: str) -> None:
        self._namespace = namespace
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(MODULE)
        if self._namespace.get(self._name) is self:
            self._namespace[self._name] = module
        return getattr(module, attr)


def deepspeed_comm(namespace: dict[str, Any], name: str = "dist") -> Any:
    """A stand-in for ``deepspeed.comm`` bound to ``namespace[name]`` (pass the module's ``globals()``)."""
    return LazyComm(namespace, name)
