"""The quantization ops, registered with the dispatcher, the way bitsandbytes and torchao do.

Every op is defined here once (schema, fake kernel, reference kernel as the default) with
``torch.library``; backends add kernels, and the public functions below only pick which op to call.

Ops (namespace ``agoq``):

* ``quantize`` / ``dequantize``: the device's native kernels. The pure-torch reference is the
  default kernel (``CompositeExplicitAutograd``); ``csrc/cpu/agoq_quant.cpp`` registers the C++
  kernels for ``CPU`` and ``csrc/cuda/agoq_quant_binding.cpp`` the CUDA ones for ``CUDA``
  (``TORCH_LIBRARY_IMPL``) when their extension loads, so a call costs what an aten op costs.
* ``dequantize_add_`` / ``requantize_add_``: the fused gradient ops (``fused.py``), in place
  (``Tensor(a!)``). Default kernel: the composition of ``agoq::quantize``/``agoq::dequantize`` that
  defines them; the C++ extension registers fused ``CPU`` kernels.
* ``quantize_reference`` / ``dequantize_reference``: the reference on every device (``kernel_backend:
  "torch"``, also on a CPU whose ``agoq::quantize`` is the C++ kernel).
* ``quantize_triton`` / ``dequantize_triton``: ``torch.library.triton_op`` s (the launches wrapped
  with ``wrap_triton``, so ``torch.compile`` sees the Triton kernels), defined when
  ``triton_backend.py`` is imported, i.e. when the Triton backend is first chosen.

``BACKEND_OPS`` maps each backend to its ``quantize``/``dequantize`` op; which backend runs is
``backends.Kernels``' choice (per engine: ``kernels=``), or ``backend=`` by name. Under
``torch.compile`` the choice is static (``Kernels.compiled``) and the calls are graph nodes.

Adding a kernel touches at most 3 places (``tests/quant/test_registry.py`` fails when they disagree):

1. the kernel and its registration, in one file: an ``m.impl`` line in the ``TORCH_LIBRARY_IMPL``
   block next to a C++/CUDA kernel (``csrc/<device>/``), or a ``triton_op`` in ``triton_backend.py``;
2. the table saying who runs it, here: ``NATIVE_KERNELS`` (a native C++/CUDA kernel of an op) or
   ``BACKEND_OPS`` (a backend's quantize/dequantize ops), ``FUSED_OPS`` for a new fused op;
3. for a new op only: its ``_define(...)`` here (schema, reference default kernel and fake kernel in
   one call) and its Python entry point (here, or ``fused.py`` for the fused ops).

The Python side only chooses which op to call (``Kernels``, cached per device, op and width); every
kernel is reached through the dispatcher. (``cpp_backend``/``cuda_backend``/``triton_backend`` keep
their Python entry points for ``autotune``, the benchmarks and the tests.)
"""

from __future__ import annotations

import torch

from . import backends
from .format import QuantizedTensor, check_params, num_groups, packed_bytes

DISPATCHER = "dispatcher"
"""Pseudo-backend: the device's registered kernel of the ``agoq::`` op (native if loaded, else the
reference). The fused ops' default kernels compose these."""

NATIVE = {"cpu": "cpp", "cuda": "cuda"}
"""Device type -> the backend whose kernels are the device's dispatcher kernels."""

NATIVE_KERNELS = {
    "cpu": ("quantize", "dequantize", "dequantize_add_", "requantize_add_"),
    "cuda": ("quantize", "dequantize"),
}
"""Ops with a native kernel per device (``TORCH_LIBRARY_IMPL`` in ``csrc/<device>``); the others run
their default kernel there."""

_lib = torch.library.Library("agoq", "DEF")  # kept for the life of the process

SCHEMAS: dict[str, str] = {}
"""Schema of every op defined here (the Triton ones are inferred in ``triton_backend.py``)."""


def _define(name: str, schema: str, default, fake) -> None:
    """Define ``agoq::<name>``: its schema, its default kernel (every device without its own) and its
    fake kernel (``torch.compile``/FakeTensor tracing), in one place."""
    _lib.define(name + schema)
    _lib.impl(name, default, "CompositeExplicitAutograd")
    torch.library.register_fake(f"agoq::{name}", fake, lib=_lib)
    SCHEMAS[name] = schema


def _signed64(seed: int) -> int:
    """``seed``'s low 64 bits as the schema's int64 (the kernels read the same bits as uint64)."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


# --- the reference (default) kernels and the fake kernels -----------------------------------------


def _quantize_reference(x, bits, group_size, symmetric, stochastic, seed, scale_dtype):
    from . import reference

    seed &= (1 << 64) - 1  # the reference seeds torch's generator with the unsigned value
    x = x.contiguous()
    codes, scales, zeros = reference.quantize(x, bits, group_size, symmetric, stochastic, seed, scale_dtype)
    # An op returns tensors only: symmetric quantization has no zeros, an empty tensor stands in.
    return codes, scales, zeros if zeros is not None else scales.new_empty(0, dtype=torch.float32)


def _dequantize_reference(codes, scales, zeros, bits, group_size, numel, out_dtype):
    from . import reference

    return reference.dequantize(codes, scales, zeros if zeros.numel() else None, bits, group_size, numel, out_dtype)


def _dequantize_add_default(out, codes, scales, group_size):
    empty = scales.new_empty(0, dtype=torch.float32)
    out.add_(torch.ops.agoq.dequantize(codes, scales, empty, 8, group_size, out.numel(), torch.float32).view(out.shape))


def _requantize_add_default(codes, scales, addend, has_value, group_size, stochastic, seed):
    from .fused import requantize_add_composed

    requantize_add_composed(codes, scales, addend, has_value, group_size, stochastic, seed, DISPATCHER)


def quantize_fake(x, bits, group_size, symmetric, stochastic, seed, scale_dtype):
    """The outputs ``agoq::quantize`` (and every backend's quantize op) gives ``x``, as empty tensors."""
    n = x.numel()
    code_dtype = torch.int8 if bits == 8 and symmetric else torch.uint8
    g = num_groups(n, group_size)
    codes = x.new_empty(packed_bytes(n, bits), dtype=code_dtype)
    return codes, x.new_empty(g, dtype=scale_dtype), x.new_empty(0 if symmetric else g, dtype=torch.float32)


def dequantize_fake(codes, scales, zeros, bits, group_size, numel, out_dtype):
    """The output of ``agoq::dequantize``, as an empty tensor."""
    return codes.new_empty(numel, dtype=out_dtype)


def _writes_only(*args) -> None:
    """Fake kernel of an in-place op: no outputs."""
    return None


_QUANTIZE = (
    "(Tensor x, int bits, int group_size, bool symmetric, bool stochastic, int seed, ScalarType scale_dtype)"
    " -> (Tensor, Tensor, Tensor)"
)
_DEQUANTIZE = (
    "(Tensor codes, Tensor scales, Tensor zeros, int bits, int group_size, SymInt numel, ScalarType out_dtype)"
    " -> Tensor"
)
_define("quantize", _QUANTIZE, _quantize_reference, quantize_fake)
_define("dequantize", _DEQUANTIZE, _dequantize_reference, dequantize_fake)
_define("quantize_reference", _QUANTIZE, _quantize_reference, quantize_fake)
_define("dequantize_reference", _DEQUANTIZE, _dequantize_reference, dequantize_fake)
_define(
    "dequantize_add_",
    "(Tensor(a!) out, Tensor codes, Tensor scales, int group_size) -> ()",
    _dequantize_add_default,
    _writes_only,
)
_define(
    "requantize_add_",
    "(Tensor(a!) codes, Tensor(b!) scales, Tensor addend, bool has_value, int group_size, bool stochastic, int seed)"
    " -> ()",
    _requantize_add_default,
    _writes_only,
)


# --- which op a backend runs ------------------------------------------------------------------------

BACKEND_OPS: dict[str, tuple[str, str]] = {
    "cpp": ("quantize", "dequantize"),
    "cuda": ("quantize", "dequantize"),
    DISPATCHER: ("quantize", "dequantize"),
    "torch": ("quantize_reference", "dequantize_reference"),
    "triton": ("quantize_triton", "dequantize_triton"),
}
"""Backend -> its ``agoq::`` quantize and dequantize ops (same schemas, same contract)."""

FUSED_OPS = ("dequantize_add_", "requantize_add_")
"""The fused gradient ops (``fused.py``): one op each for every backend; a native kernel where
``NATIVE_KERNELS`` lists one, else the default kernel (the composition of the device's ops), and
the same composition in Python for the backends that are not native (``triton``, ``torch``)."""


_OPS: dict[str, tuple[torch._ops.OpOverload, torch._ops.OpOverload]] = {}
"""``backend_ops`` per backend (looking an op up on ``torch.ops`` costs a microsecond or two per call)."""


def backend_ops(name: str) -> tuple[torch._ops.OpOverload, torch._ops.OpOverload]:
    """The ``quantize``/``dequantize`` ops of backend ``name`` (the Triton ones exist once it loaded)."""
    ops = _OPS.get(name)
    if ops is None:
        q, dq = BACKEND_OPS[name]
        ops = _OPS[name] = (getattr(torch.ops.agoq, q).default, getattr(torch.ops.agoq, dq).default)
    return ops


def backend_for(device: torch.device, op: str, bits: int, backend: str | None, kernels: backends.Kernels | None) -> str:
    """The backend that runs ``op`` on ``device``: ``backend`` when named (loaded, or
    ``BackendUnavailable``), else the choice of ``kernels`` (the process default when ``None``)."""
    if backend is not None:
        if backend != DISPATCHER and not torch.compiler.is_compiling():
            backends.get(backend)
            native = NATIVE.get(device.type)
            if backend in NATIVE.values() and backend != native:
                raise ValueError(f"backend={backend!r} does not run on {device.type} tensors")
        return backend
    if kernels is None:
        kernels = backends.default_kernels()
    if torch.compiler.is_compiling():
        return kernels.compiled(device.type)
    return kernels.select(device, op, bits)  # loads it: native kernels register here


_CHECKED: set[tuple] = set()
"""Parameter combinations ``check_params`` accepted already."""


def quantize(
    x: torch.Tensor,
    bits: int = 8,
    group_size: int = 128,
    *,
    symmetric: bool = True,
    stochastic: bool = False,
    seed: int = 0,
    scale_dtype: torch.dtype = torch.float32,
    backend: str | None = None,
    kernels: backends.Kernels | None = None,
) -> QuantizedTensor:
    """Blockwise-quantize ``x`` (fp32/bf16/fp16, any shape) to ``bits`` per element.

    ``symmetric`` selects absmax (signed codes) or min/max (for one-signed tensors); ``stochastic``
    selects unbiased stochastic rounding driven by ``seed``. ``kernels`` is the caller's backend
    choice (an engine's ``Kernels``; the process default when ``None``); ``backend`` forces one
    backend by name instead. NaN/Inf are preserved (see ``format.py``).
    """
    params = (bits, group_size, symmetric, scale_dtype)
    if params not in _CHECKED:
        check_params(bits, group_size, symmetric, scale_dtype)
        _CHECKED.add(params)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"quantize: dtype {x.dtype} not supported; use float32, bfloat16 or float16")
    op = backend_ops(backend_for(x.device, "quantize", bits, backend, kernels))[0]
    codes, scales, zeros = op(x, bits, group_size, symmetric, stochastic, _signed64(seed), scale_dtype)
    return QuantizedTensor(codes, scales, None if symmetric else zeros, x.shape, x.dtype, bits, group_size)


def dequantize(
    q: QuantizedTensor,
    *,
    backend: str | None = None,
    kernels: backends.Kernels | None = None,
    flat: bool = False,
) -> torch.Tensor:
    """Restore a tensor of the original shape and dtype from ``q`` (``flat``: as a 1-D tensor, for
    callers that give it their own shape or strides). ``kernels``/``backend``: as for ``quantize``."""
    device = q.codes.device
    zeros = q.zeros
    if zeros is None:
        zeros = _NO_ZEROS.get(device)
        if zeros is None:
            zeros = _NO_ZEROS[device] = torch.empty(0, dtype=torch.float32, device=device)
    op = backend_ops(backend_for(device, "dequantize", q.bits, backend, kernels))[1]
    out = op(q.codes, q.scales, zeros, q.bits, q.group_size, q.numel, q.dtype)
    return out if flat else out.view(tuple(q.shape))


_NO_ZEROS: dict[torch.device, torch.Tensor] = {}
"""Per device, the empty ``zeros`` input of symmetric codes (an input, so one tensor serves every call)."""
