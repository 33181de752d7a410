"""``GradientCheck``: the debug guard behind ``agoq.gradient.check_steps``.

While it runs, a tensor hook on every trainable parameter adds the gradient autograd produces into an
fp32 shadow: the exact local sum stock DeepSpeed would reduce. Before each of the first
``check_steps`` optimizer steps the shadows are summed over the data-parallel group in fp32 and set
beside the gradient the optimizer is about to use (DeepSpeed's ``safe_get_full_grad``, which every
agoq host serves). A parameter fails when

* agoq's gradient is missing or all zero while the exact one exceeds the 8-bit path's resolution,
  ``K (N + 1) / 127`` of the largest exact gradient element (``K`` backward passes, ``N`` ranks: the
  most any element can lose to quantization, see ``tests/gradient/parity_workers.update_bound``), or
* the exact gradient holds NaN/Inf and agoq's does not (a hidden overflow).

Both comparisons are scale-free (averaging and loss scaling cancel), so the check needs no knowledge
of the host. It raises ``AgoqGradientError`` naming the parameter. After ``check_steps`` steps the
hooks are removed and the shadows freed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class AgoqGradientError(RuntimeError):
    """A parameter's gradient through agoq is wrong (raised by the ``check_steps`` guard)."""


class GradientCheck:
    """Exact fp32 shadows of the gradients and the check against agoq's (see module docstring)."""

    def __init__(self, named_params: Sequence[tuple[str, nn.Parameter]], steps: int) -> None:
        self.params = [(name, p) for name, p in named_params if p.requires_grad]
        """The trainable parameters checked, with their names."""
        self.steps_left = steps
        """Checks still to run."""
        self._shadow: dict[int, torch.Tensor] = {}
        self._passes: dict[int, int] = {}
        self._handles = [p.register_hook(self._recorder(p)) for _, p in self.params]

    def _recorder(self, param: nn.Parameter):
        key = id(param)

        def record(grad: torch.Tensor) -> None:
            shadow = self._shadow.get(key)
            if shadow is None:
                self._shadow[key] = grad.detach().float().clone()
            else:
                shadow.add_(grad.detach().float())
            self._passes[key] = self._passes.get(key, 0) + 1

        return record

    @property
    def active(self) -> bool:
        """Whether checks remain."""
        return self.steps_left > 0

    def remove(self) -> None:
        """Remove the hooks and free the shadows."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._shadow.clear()

    def check(self, step: int, *, group: Any, world_size: int) -> None:
        """Compare agoq's gradients (about to be stepped on) with the exact ones; raise on a failure.
        Every rank of ``group`` must call this at the same point."""
        from deepspeed import comm as dist
        from deepspeed.utils import safe_get_full_grad

        device = next((p.device for _, p in self.params), torch.device("cpu"))
        shapes = [(_full_shape(p), id(p)) for _, p in self.params]
        flat = (
            torch.cat(
                [self._shadow.get(key, torch.zeros(shape, device=device)).reshape(-1).float() for shape, key in shapes]
            )
            if shapes
            else torch.zeros(0, device=device)
        )
        passes = torch.tensor([float(max(self._passes.values(), default=0))], device=device)
        if world_size > 1:
            dist.all_reduce(flat, group=group)
            dist.all_reduce(passes, op=dist.ReduceOp.MAX, group=group)
        finite = flat[torch.isfinite(flat)]
        largest = float(finite.abs().max()) if finite.numel() else 0.0
        resolution = float(passes) * (world_size + 1) / 127 * largest
        offset = 0
        failures = []
        for (name, param), (shape, _) in zip(self.params, shapes, strict=True):
            numel = int(torch.Size(shape).numel())
            exact = flat[offset : offset + numel]
            offset += numel
            got = safe_get_full_grad(param)
            got_finite = got is None or bool(torch.isfinite(got).all())
            if not bool(torch.isfinite(exact).all()):
                if got_finite:
                    failures.append(f"{name!r}: the exact gradient has NaN/Inf, agoq's is finite (hidden overflow)")
                continue
            peak = float(exact.abs().max()) if numel else 0.0
            if peak > resolution and (got is None or not bool(got.count_nonzero())):
                failures.append(
                    f"{name!r}: agoq's gradient is {'missing' if got is None else 'all zero'} although the exact "
                    f"one reaches {peak:.3g} (the 8-bit path cannot lose more than {resolution:.3g})"
                )
        self._shadow.clear()
        self._passes.clear()
        self.steps_left -= 1
        if not self.active:
            self.remove()
        if failures:
            raise AgoqGradientError(
                f"agoq.gradient.check_steps, step {step}: " + "; ".join(failures) + ". This is a bug in agoq-ds; "
                "set agoq.gradient.enabled=false to train with DeepSpeed's own gradients meanwhile."
            )


def _full_shape(param: nn.Parameter) -> torch.Size:
    """The gradient's shape (a ZeRO-3 parameter's full ``ds_shape``)."""
    return getattr(param, "ds_shape", None) or param.shape
