"""``OptimizerHost``: what the three DeepSpeed optimizer subclasses (ZeRO-1/2, ZeRO-3, ``BF16_Optimizer``)
do the same way around DeepSpeed's own code: refuse what they cannot honour, settle the agoq config
and open the ``GradientStore`` before DeepSpeed's ``__init__``; add and restore the store's state in
DeepSpeed's optimizer ``state_dict``."""

from __future__ import annotations

import inspect
from typing import Any

from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import logger

from ..config import AgoqConfig, GradientConfig
from ..gradient.host import GradientHost
from ..gradient.store import STATE_KEY, GradientStore
from .unsupported import reject_unsupported_arguments


class OptimizerHost(GradientHost):
    """Mixin placed before the DeepSpeed optimizer class in an agoq subclass's bases."""

    agoq_config: AgoqConfig | None = None
    """The agoq settings; ``install`` binds them to a subclass."""

    @property
    def agoq_gradient(self) -> GradientConfig:
        """The ``agoq.gradient`` settings in use."""
        return self.agoq_config.gradient

    def _agoq_begin(
        self, deepspeed_init: Any, args: tuple, kwargs: dict, agoq_config: AgoqConfig | None, host: str
    ) -> None:
        """Before DeepSpeed's ``__init__`` (whose arguments ``args``/``kwargs`` are): refuse unsupported
        arguments by name, settle the config, open the store on the data-parallel group."""
        bound = inspect.signature(deepspeed_init).bind(self, *args, **kwargs)
        bound.apply_defaults()
        reject_unsupported_arguments(bound.arguments)
        self.agoq_config = agoq_config or type(self).agoq_config or AgoqConfig()
        self._agoq_active = False  # DeepSpeed's own code paths until the subclass's setup
        group = bound.arguments["dp_process_group"]
        self.agoq_store = GradientStore(
            self.agoq_config,
            host=host,
            rank=dist.get_rank(group=group),
            world_size=dist.get_world_size(group=group),
            device=get_accelerator().current_device_name(),
        )

    def step(self, closure: Any = None) -> None:
        """DeepSpeed's step between the host's ``agoq_before_step`` (while active) and
        ``agoq_after_step``."""
        if self.agoq_active:
            self.agoq_before_step()
        super().step(closure)
        self.agoq_after_step(overflow=bool(self.overflow))

    def _agoq_layout(self) -> dict[str, Any]:
        """The host's own figures that a checkpoint's state must match to be restored."""
        return {}

    def _agoq_with_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """DeepSpeed's optimizer ``state`` plus ``STATE_KEY`` (the store's state) when the path is on;
        stock DeepSpeed ignores the key when loading."""
        if self.agoq_active:
            state[STATE_KEY] = self.agoq_store.state(**self._agoq_layout())
        return state

    def _agoq_saved_state(self, state_dict_list: Any, load_optimizer_states: bool, checkpoint_folder: Any) -> Any:
        """This rank's agoq state in the per-rank files DeepSpeed loads (None: a universal checkpoint,
        optimizer states not loaded, a stock checkpoint). Read before DeepSpeed's ``load_state_dict``,
        which may drop the list's entries."""
        if not (self.agoq_active and load_optimizer_states) or checkpoint_folder:
            return None
        rank = self.agoq_store.rank
        if not isinstance(state_dict_list, list | tuple) or len(state_dict_list) <= rank:
            return None
        return state_dict_list[rank].get(STATE_KEY)

    def _agoq_restore(self, state: Any) -> None:
        """Restore ``state`` when it fits this layout; otherwise residuals start from zero (said once)."""
        if not self.agoq_active:
            return
        why = self.agoq_store.mismatch(state, **self._agoq_layout())
        restored = self.agoq_store.load_state(state, **self._agoq_layout())
        if not restored and state is not None and self.agoq_store.rank == 0:
            reason = why or "a residual does not fit"
            logger.warning(
                f"agoq: the checkpoint's gradient state is not restored: {reason}; error feedback starts from zero"
            )
