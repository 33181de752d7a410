"""The bit-width of a saved tensor, from its module name and layer class.

Resolution order (first hit wins):

1. ``exclude`` patterns -> 16 (kept as is);
2. ``rules`` (by class, module-name glob, pipeline stage; the last matching rule wins);
3. per-module overrides set by the stage-aware balancing (``allocate.balance_stages``);
4. the class table: the policy's table (``agoq``/``uniform`` + ``class_bits``), with the classes
   chosen by budget mode (``allocate.allocate_budget``) replacing their entries.

Steps 1-2 are the user's explicit wishes: the allocators never change what they decide ("pinned").
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import ActivationConfig, ActivationRule


class BitPolicy:
    """Bits per (module name, class) for one pipeline stage."""

    def __init__(self, config: ActivationConfig, stage_id: int = 0) -> None:
        self.config = config
        self.stage_id = stage_id
        self.base_table: dict[str, int] = config.class_table()
        """The configured class table (policy + ``class_bits``)."""
        self.class_bits: dict[str, int] = dict(self.base_table)
        """The effective class table (budget mode may have replaced entries)."""
        self.overrides: dict[tuple[str, str], int] = {}
        """(module name, class) -> bits set by stage-aware balancing."""
        self._rules = [r for r in config.rules if r.stage is None or r.stage == stage_id]
        self._cache: dict[tuple[str, str], int] = {}

    def bits(self, module: str, cls: str) -> int:
        """Bits for tensors of class ``cls`` saved in module ``module`` (16: not quantized)."""
        key = (module, cls)
        found = self._cache.get(key)
        if found is None:
            found = self._resolve(module, cls)
            self._cache[key] = found
        return found

    def _resolve(self, module: str, cls: str) -> int:
        pinned = self.pinned_bits(module, cls)
        if pinned is not None:
            return pinned
        if (module, cls) in self.overrides:
            return self.overrides[(module, cls)]
        return self.class_bits[cls]

    def pinned_bits(self, module: str, cls: str) -> int | None:
        """The bits the user fixed for (module, class) by ``exclude`` or a rule, else ``None``."""
        if any(fnmatchcase(module, p) for p in self.config.exclude):
            return 16
        rule = next((r for r in reversed(self._rules) if _matches(r, module, cls)), None)
        return rule.bits if rule is not None else None

    def class_pinned(self, cls: str) -> bool:
        """Whether the user fixed ``cls`` in ``class_bits`` (budget mode leaves it alone)."""
        return cls in {str(getattr(k, "value", k)) for k in self.config.class_bits}

    def table(self) -> dict[str, int]:
        """The effective class -> bits table: the class table with rules that name a class but no
        module applied (module-specific rules and overrides are not class-wide)."""
        out = dict(self.class_bits)
        for rule in self._rules:
            if rule.module is None and rule.layer_class is not None:
                out[str(getattr(rule.layer_class, "value", rule.layer_class))] = rule.bits
            elif rule.module is None:
                out = {c: rule.bits for c in out}
        return out

    def set_class_bits(self, table: dict[str, int]) -> None:
        """Replace entries of the effective class table (budget mode)."""
        self.class_bits.update(table)
        self._cache.clear()

    def set_overrides(self, overrides: dict[tuple[str, str], int]) -> None:
        """Replace the per-module overrides (stage-aware balancing)."""
        self.overrides = dict(overrides)
        self._cache.clear()


def _matches(rule: ActivationRule, module: str, cls: str) -> bool:
    if rule.layer_class is not None and str(getattr(rule.layer_class, "value", rule.layer_class)) != cls:
        return False
    return rule.module is None or fnmatchcase(module, rule.module)
