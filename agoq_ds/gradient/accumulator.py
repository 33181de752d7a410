"""Gradient accumulation buffers: int8 with per-block scales (plus an 8-bit error-feedback residual),
and a plain fp32 one with the same interface.

``Int8Accumulator`` holds a flat vector of ``numel`` elements as int8 codes with one fp32 scale per
``group_size`` consecutive elements (groups aligned to element 0). ``add_(values, positions)``
dequantizes the groups the pieces touch, adds the pieces (and the carried residual) in fp32 and
quantizes those groups again. With error feedback, the rounding error of that requantization is
kept (quantized to 8 bits itself) and added to the next accumulation, including the first one after
an optimizer step, so the error does not grow with the number of micro-batches:

    x_k = D(A_{k-1}) + D(R_{k-1}) + g_k,   A_k = Q(x_k),   r_k = x_k - D(A_k),   R_k = Q(r_k)
    D(A_K) = sum_k g_k + D(R_0) - r_K - sum_{k<K} e_k,     e_k = r_k - D(R_k)

so ``|D(A_K) - sum g - D(R_0)| <= bound(A_K) + sum_{k<K} bound(R_k)`` per element, where
``bound(R_k) <= bound(A_k) / 127`` (``|r_k| <= bound(A_k)``). Without error feedback every
requantization adds up to ``bound(A_k)``: the error grows linearly with K. Non-finite groups stay
NaN (the overflow check must see them); their residual is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..quant import Kernels, QuantizedTensor, dequantize, quantize
from ..quant.format import num_groups
from ..quant.fused import requantize_add_

Positions = Sequence[tuple[int, int]]
"""``(offset, numel)`` pieces of the accumulator, in the order their values are concatenated."""

Values = torch.Tensor | Sequence[torch.Tensor]
"""What ``add_`` adds: the pieces concatenated (one 1-D tensor), or one 1-D tensor per piece (views
of a bucket, so that nobody concatenates them first)."""

SPAN_CHUNK = 1 << 24
"""Most elements requantized in one pass (rounded down to whole groups): bounds the fp32
temporaries of ``Int8Accumulator.add_`` (the same size as ``allreduce.CHUNK_ELEMENTS``). Spans of
up to this many elements are quantized exactly as one span; longer ones in group-aligned chunks,
which is the same result under round-to-nearest (groups are independent) and differs only in the
stochastic-rounding draws."""


def _piece_list(values: Values, positions: Positions) -> list[torch.Tensor]:
    """One 1-D view per piece of ``positions``."""
    if isinstance(values, torch.Tensor):
        values = values.reshape(-1)
        total = sum(n for _, n in positions)
        if values.numel() != total:
            raise ValueError(f"add_: {values.numel()} values for pieces totalling {total}")
        starts = accumulate((n for _, n in positions), initial=0)
        return [values.narrow(0, s, n) for s, (_, n) in zip(starts, positions, strict=False)]
    pieces = [v.reshape(-1) for v in values]
    if len(pieces) != len(positions) or any(v.numel() != n for v, (_, n) in zip(pieces, positions, strict=True)):
        raise ValueError("add_: the value pieces do not match positions")
    return pieces


def _adjacent(inside: list[tuple[int, int, int]], views: list[torch.Tensor]) -> bool:
    """Whether the views follow each other without gaps, in the accumulator and in one storage."""
    first = views[0]
    for k in range(1, len(views)):
        prev, view = views[k - 1], views[k]
        if inside[k][1] != inside[k - 1][2] or view.dtype != first.dtype or view.stride(0) != 1 or prev.stride(0) != 1:
            return False
        if view.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return False
        if view.storage_offset() != prev.storage_offset() + prev.numel():
            return False
    return True


def _chunked(spans: list[tuple[int, int, list[int]]], chunk: int) -> list[tuple[int, int, list[int]]]:
    """``spans`` split into group-aligned chunks of at most ``chunk`` elements (``chunk`` a multiple of
    the group size); each chunk with the pieces that overlap it."""
    if chunk <= 0:
        return spans
    return [(a, min(a + chunk, hi), members) for lo, hi, members in spans for a in range(lo, hi, chunk)]


if TYPE_CHECKING:
    from ..config import GradientConfig


class Accumulator(Protocol):
    """What the ZeRO optimizer needs from a gradient accumulation buffer."""

    numel: int
    has_value: bool

    def add_(self, values: Values, positions: Positions | None = None, *, seed: int = 0) -> None:
        """Add ``values`` (pieces concatenated in ``positions`` order, or one tensor per piece) at their offsets."""

    def dequantize(self) -> torch.Tensor:
        """The accumulated value in fp32; it may share storage with the accumulator (``Fp32Accumulator``),
        so it is valid only until the next ``add_`` or ``reset``. Use ``take`` to keep it past those."""

    def take(self) -> torch.Tensor:
        """The accumulated value in fp32, owned by the caller; the accumulator is emptied (``reset``)."""

    def reset(self) -> None:
        """Forget the accumulated value (an error-feedback residual is kept)."""

    def reset_residual(self) -> None:
        """Forget the error-feedback residual, if any."""

    @property
    def nbytes(self) -> int:
        """Bytes held for the value."""

    @property
    def residual_nbytes(self) -> int:
        """Bytes held for the error-feedback residual."""


def _spans(positions: Positions, group_size: int, numel: int) -> list[tuple[int, int, list[int]]]:
    """Group-aligned ``[start, end)`` spans covering the pieces, merging pieces at most one group
    apart; each with the indices of its pieces."""
    order = sorted((p for p in range(len(positions)) if positions[p][1] > 0), key=lambda p: positions[p][0])
    spans: list[tuple[int, int, list[int]]] = []
    for p in order:
        off, n = positions[p]
        lo = off // group_size * group_size
        hi = min(-(-(off + n) // group_size) * group_size, numel)
        if spans and lo <= spans[-1][1] + group_size:
            start, end, members = spans[-1]
            spans[-1] = (start, max(end, hi), [*members, p])
        else:
            spans.append((lo, hi, [p]))
    return spans


class Int8Accumulator:
    """A flat fp32 accumulator stored as int8 codes + fp32 per-group scales (see module docstring)."""

    def __init__(
        self,
        numel: int,
        group_size: int = 128,
        *,
        stochastic: bool = False,
        error_feedback: bool = True,
        device: torch.device | str | None = None,
        release_on_reset: bool = False,
        kernels: Kernels | None = None,
    ) -> None:
        self.numel = int(numel)
        """Elements held."""
        self.release_on_reset = release_on_reset
        """Free the value's storage on ``reset`` (allocated again by the next ``add_``) instead of
        zeroing it: a buffer that lives only within an optimizer step."""
        self.group_size = group_size
        """Elements per scale."""
        self.stochastic = stochastic
        """Stochastic instead of round-to-nearest requantization."""
        self.error_feedback = error_feedback
        """Carry the requantization residual into the next accumulation."""
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.kernels = kernels
        """The engine's kernel choice (``None``: the process default)."""
        self.codes: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None
        self.res_codes: torch.Tensor | None = None
        self.res_scales: torch.Tensor | None = None
        self.has_value = False
        """True when something was added since the last ``reset``."""

    # --- storage -------------------------------------------------------------------------------

    def _allocate(self) -> None:
        if self.codes is None:
            g = num_groups(self.numel, self.group_size)
            self.codes = torch.zeros(self.numel, dtype=torch.int8, device=self.device)
            self.scales = torch.zeros(g, dtype=torch.float32, device=self.device)

    def _allocate_residual(self) -> None:
        if self.res_codes is None:
            g = num_groups(self.numel, self.group_size)
            self.res_codes = torch.zeros(self.numel, dtype=torch.int8, device=self.device)
            self.res_scales = torch.zeros(g, dtype=torch.float32, device=self.device)

    @property
    def nbytes(self) -> int:
        """Bytes of the accumulated value (codes + scales) currently allocated."""
        if self.codes is None:
            return 0
        return self.codes.numel() + 4 * self.scales.numel()

    @property
    def residual_nbytes(self) -> int:
        """Bytes of the error-feedback residual currently allocated."""
        if self.res_codes is None:
            return 0
        return self.res_codes.numel() + 4 * self.res_scales.numel()

    # --- arithmetic ----------------------------------------------------------------------------

    def _view(self, codes: torch.Tensor, scales: torch.Tensor, lo: int, hi: int) -> QuantizedTensor:
        g0, g1 = lo // self.group_size, num_groups(hi, self.group_size)
        return QuantizedTensor(
            codes[lo:hi], scales[g0:g1], None, torch.Size([hi - lo]), torch.float32, 8, self.group_size
        )

    def _store(self, codes: torch.Tensor, scales: torch.Tensor, lo: int, x: torch.Tensor, seed: int) -> QuantizedTensor:
        q = quantize(x, 8, self.group_size, stochastic=self.stochastic, seed=seed, kernels=self.kernels)
        codes[lo : lo + x.numel()] = q.codes
        g0 = lo // self.group_size
        scales[g0 : g0 + q.scales.numel()] = q.scales
        return q

    def add_(self, values: Values, positions: Positions | None = None, *, seed: int = 0) -> None:
        """Add the pieces of ``values`` (1-D, concatenated in ``positions`` order, or one tensor per
        piece) at their offsets.

        ``positions`` defaults to the whole accumulator. ``seed`` drives stochastic rounding. fp32
        temporaries are at most ``SPAN_CHUNK`` elements (plus one group) however large the pieces.
        """
        if positions is None:
            positions = [(0, self.numel)]
        pieces = _piece_list(values, positions)
        self._allocate()
        if self.error_feedback:
            self._allocate_residual()
        chunk = max(SPAN_CHUNK // self.group_size, 1) * self.group_size
        for i, (lo, hi, members) in enumerate(_chunked(_spans(positions, self.group_size, self.numel), chunk)):
            span_seed = (seed * 1000003 + i) % (2**31)
            if not self.error_feedback:
                # One fused pass: codes := Q(D(codes) + pieces), no full-size fp32 temporaries.
                g0, g1 = lo // self.group_size, num_groups(hi, self.group_size)
                requantize_add_(
                    self.codes[lo:hi],
                    self.scales[g0:g1],
                    self._span_addend(pieces, positions, lo, hi, members),
                    has_value=self.has_value,
                    group_size=self.group_size,
                    stochastic=self.stochastic,
                    seed=span_seed,
                    kernels=self.kernels,
                )
                continue
            x = self._span_value(pieces, positions, lo, hi, members)
            x += dequantize(self._view(self.res_codes, self.res_scales, lo, hi), kernels=self.kernels)
            stored = self._store(self.codes, self.scales, lo, x, span_seed)
            residual = torch.nan_to_num(x - dequantize(stored, kernels=self.kernels), nan=0.0, posinf=0.0, neginf=0.0)
            self._store(self.res_codes, self.res_scales, lo, residual, (span_seed + 7919) % (2**31))
        self.has_value = True

    @staticmethod
    def _span_addend(
        pieces: list[torch.Tensor], positions: Positions, lo: int, hi: int, members: list[int]
    ) -> torch.Tensor:
        """The pieces' values falling in ``[lo, hi)`` laid out over that range (zeros between pieces); a
        view of a piece when one piece covers the range exactly."""
        inside = []
        for p in members:
            off, n = positions[p]
            a, b = max(off, lo), min(off + n, hi)
            if a < b:
                inside.append((p, a, b))
        views = [pieces[p].narrow(0, a - positions[p][0], b - a) for p, a, b in inside]
        if inside and inside[0][1] == lo and inside[-1][2] == hi and _adjacent(inside, views):
            if len(views) == 1:
                return views[0]
            first = views[0]  # consecutive in the accumulator and in memory: one view over them
            return first.as_strided((hi - lo,), (1,), first.storage_offset())
        addend = torch.zeros(hi - lo, dtype=torch.float32, device=pieces[members[0]].device)
        for (_, a, b), view in zip(inside, views, strict=True):
            addend[a - lo : b - lo] += view
        return addend

    def _span_value(
        self, pieces: list[torch.Tensor], positions: Positions, lo: int, hi: int, members: list[int]
    ) -> torch.Tensor:
        """Accumulated value of ``[lo, hi)`` plus the pieces that fall in it, as a new fp32 tensor."""
        addend = self._span_addend(pieces, positions, lo, hi, members)
        if self.has_value:
            return dequantize(self._view(self.codes, self.scales, lo, hi), kernels=self.kernels).add_(addend)
        return addend.float() if addend.dtype != torch.float32 else addend.clone()

    def dequantize(self) -> torch.Tensor:
        """The accumulated value as a new fp32 tensor (zeros when nothing was added)."""
        if self.codes is None or not self.has_value:
            return torch.zeros(self.numel, dtype=torch.float32, device=self.device)
        return dequantize(self._view(self.codes, self.scales, 0, self.numel), kernels=self.kernels)

    def take(self) -> torch.Tensor:
        """The accumulated value as a new fp32 tensor; the accumulator is emptied (``reset``)."""
        value = self.dequantize()
        self.reset()
        return value

    def dequantize_range(self, start: int, end: int) -> torch.Tensor:
        """Elements ``[start, end)`` as a new fp32 tensor; ``start`` must be a multiple of ``group_size``
        (lets a caller materialize a large accumulator chunk by chunk)."""
        if start % self.group_size or not 0 <= start <= end <= self.numel:
            raise ValueError(f"dequantize_range({start}, {end}): start must be group-aligned and inside {self.numel}")
        if self.codes is None or not self.has_value:
            return torch.zeros(end - start, dtype=torch.float32, device=self.device)
        return dequantize(self._view(self.codes, self.scales, start, end), kernels=self.kernels)

    def residual(self) -> torch.Tensor:
        """The carried error-feedback residual as fp32 (zeros when there is none)."""
        if self.res_codes is None:
            return torch.zeros(self.numel, dtype=torch.float32, device=self.device)
        return dequantize(self._view(self.res_codes, self.res_scales, 0, self.numel), kernels=self.kernels)

    def reset(self) -> None:
        """Forget the accumulated value (storage kept, or freed with ``release_on_reset``); the
        residual is carried on."""
        if self.release_on_reset:
            self.release()
        elif self.codes is not None and self.has_value:
            self.codes.zero_()
            self.scales.zero_()
        self.has_value = False

    def reset_residual(self) -> None:
        """Forget the error-feedback residual."""
        if self.res_codes is not None:
            self.res_codes.zero_()
            self.res_scales.zero_()

    def release(self) -> None:
        """Free the value's storage (allocated again on the next ``add_``); the residual is kept."""
        self.codes = self.scales = None
        self.has_value = False

    # --- checkpointing -------------------------------------------------------------------------

    def residual_state(self) -> dict[str, Any] | None:
        """The residual as plain tensors (``None`` without one): ``{"codes", "scales", "group_size"}``."""
        if self.res_codes is None:
            return None
        return {"codes": self.res_codes.clone(), "scales": self.res_scales.clone(), "group_size": self.group_size}

    def load_residual_state(self, state: dict[str, Any] | None) -> bool:
        """Restore ``residual_state()``'s result; returns False (residual reset) when it does not fit."""
        if state is None or not self.error_feedback:
            self.reset_residual()
            return state is None
        codes, scales = state["codes"], state["scales"]
        fits = (
            state.get("group_size") == self.group_size
            and codes.numel() == self.numel
            and scales.numel() == num_groups(self.numel, self.group_size)
        )
        if not fits:
            self.reset_residual()
            return False
        self._allocate_residual()
        self.res_codes.copy_(codes.to(self.res_codes.device, torch.int8))
        self.res_scales.copy_(scales.to(self.res_scales.device, torch.float32))
        return True


class Fp32Accumulator:
    """A plain fp32 flat accumulator with ``Int8Accumulator``'s interface (``storage_bits: 32``)."""

    def __init__(self, numel: int, *, device: torch.device | str | None = None, release_on_reset: bool = False):
        self.numel = int(numel)
        """Elements held."""
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.release_on_reset = release_on_reset
        """Free the buffer on ``reset`` (for transient use) instead of zeroing it."""
        self.buffer: torch.Tensor | None = None
        self.has_value = False

    @property
    def nbytes(self) -> int:
        """Bytes currently allocated."""
        return 0 if self.buffer is None else 4 * self.buffer.numel()

    @property
    def residual_nbytes(self) -> int:
        """Always 0: nothing is rounded."""
        return 0

    def add_(self, values: Values, positions: Positions | None = None, *, seed: int = 0) -> None:
        """Add the pieces of ``values`` at their offsets (see ``Int8Accumulator.add_``)."""
        if self.buffer is None:
            self.buffer = torch.zeros(self.numel, dtype=torch.float32, device=self.device)
        if positions is None:
            positions = [(0, self.numel)]
        for (off, n), piece in zip(positions, _piece_list(values, positions), strict=True):
            self.buffer[off : off + n] += piece  # in-place add: converts without a copy of the piece
        self.has_value = True

    def dequantize(self) -> torch.Tensor:
        """The buffer itself (not a copy: ``reset`` zeroes it); zeros when nothing was added."""
        if self.buffer is None:
            self.buffer = torch.zeros(self.numel, dtype=torch.float32, device=self.device)
        return self.buffer

    def take(self) -> torch.Tensor:
        """The buffer itself, handed over without a copy; the next ``add_`` starts a new one."""
        value = self.dequantize()
        self.buffer = None
        self.has_value = False
        return value

    def dequantize_range(self, start: int, end: int) -> torch.Tensor:
        """Elements ``[start, end)`` (a view of the buffer)."""
        return self.dequantize()[start:end]

    def reset(self) -> None:
        """Zero (or free) the buffer."""
        if self.release_on_reset:
            self.buffer = None
        elif self.buffer is not None and self.has_value:
            self.buffer.zero_()
        self.has_value = False

    def reset_residual(self) -> None:
        """Nothing to do."""

    def release(self) -> None:
        """Free the buffer (allocated again on the next ``add_``)."""
        self.buffer = None
        self.has_value = False

    def residual_state(self) -> None:
        """Always ``None``: nothing is rounded."""
        return None

    def load_residual_state(self, state: dict[str, Any] | None) -> bool:
        """Nothing to restore; False when ``state`` holds a residual (it does not fit)."""
        return state is None


def gradient_accumulator(
    numel: int,
    config: GradientConfig,
    *,
    device: torch.device | str | None = None,
    release_on_reset: bool = False,
    kernels: Kernels | None = None,
) -> Int8Accumulator | Fp32Accumulator:
    """The accumulator for ``numel`` gradient elements: int8 codes, or fp32 below ``config.min_numel``
    elements (quantizing a few elements saves nothing and costs their precision); ``kernels``: the
    engine's kernel choice (``None``: the process default)."""
    if numel < config.min_numel:
        return Fp32Accumulator(numel, device=device, release_on_reset=release_on_reset)
    return Int8Accumulator(
        numel,
        config.group_size,
        stochastic=config.rounding == "stochastic",
        error_feedback=config.error_feedback,
        device=device,
        release_on_reset=release_on_reset,
        kernels=kernels,
    )
