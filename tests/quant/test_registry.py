"""The op registry is consistent: every ``agoq::`` op is defined once with a fake and a default
kernel, every backend has the same op set with the same schemas, and the native kernels registered
in C++/CUDA are exactly the ones ``ops.NATIVE_KERNELS`` declares (see ``ops.py``: adding a kernel
in one place only fails here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from agoq_ds.quant import BACKEND_NAMES, backends, ops

CSRC = Path(__file__).resolve().parents[2] / "csrc"
DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _load_every_backend() -> None:
    """Load what loads here, so that every op that can be defined in this process is."""
    for name in BACKEND_NAMES:
        backends.status(name)


def _agoq_ops() -> list[str]:
    _load_every_backend()
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("agoq::"))


def _signature(op: torch._ops.OpOverload) -> list[tuple[str, str, bool]]:
    """(name, type, mutated) of every argument and the return types; ``SymInt`` (what ``triton_op``
    infers for ``int``) counts as ``int``."""
    schema = op._schema

    def kind(t) -> str:
        return str(t).replace("SymInt", "int")

    args = [(a.name, kind(a.type), bool(a.alias_info and a.alias_info.is_write)) for a in schema.arguments]
    return args + [("->", kind(r.type), False) for r in schema.returns]


def test_every_op_has_a_fake_and_a_default_kernel() -> None:
    names = _agoq_ops()
    assert {"agoq::quantize", "agoq::dequantize", "agoq::dequantize_add_", "agoq::requantize_add_"} <= set(names)
    for name in names:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd"), name
        assert torch._library.simple_registry.singleton.find(name).fake_impl.kernel is not None, name


def test_every_op_belongs_to_a_backend_or_is_a_fused_op() -> None:
    """No op is defined without a place in the registry (nor listed without being defined)."""
    listed = {f"agoq::{n}" for pair in ops.BACKEND_OPS.values() for n in pair} | {f"agoq::{n}" for n in ops.FUSED_OPS}
    defined = set(_agoq_ops())
    if backends.status("triton").detail.startswith("ModuleNotFoundError"):
        listed -= {f"agoq::{n}" for n in ops.BACKEND_OPS["triton"]}
    assert defined == listed
    assert set(ops.SCHEMAS) == {n.split("::")[1] for n in defined} - set(ops.BACKEND_OPS["triton"])


@pytest.mark.parametrize("backend", [*BACKEND_NAMES, ops.DISPATCHER])
def test_every_backend_has_the_same_op_set(backend: str) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
        import agoq_ds.quant.triton_backend  # noqa: F401  defines the Triton ops (no GPU needed)
    assert backend in ops.BACKEND_OPS
    quantize, dequantize = ops.backend_ops(backend)
    native_q, native_dq = ops.backend_ops(ops.DISPATCHER)
    assert _signature(quantize) == _signature(native_q)
    assert _signature(dequantize) == _signature(native_dq)


def test_fused_ops_mutate_what_they_write() -> None:
    written = {
        name: [a for a, _, w in _signature(getattr(torch.ops.agoq, name).default) if w] for name in ops.FUSED_OPS
    }
    assert written == {"dequantize_add_": ["out"], "requantize_add_": ["codes", "scales"]}


def _registered_in_source(device: str) -> set[str]:
    """Op names in the ``TORCH_LIBRARY_IMPL(agoq, <KEY>, m)`` blocks of ``csrc/<device>``."""
    found: set[str] = set()
    pattern = re.compile(r"TORCH_LIBRARY_IMPL\(agoq,\s*" + DISPATCH_KEYS[device] + r",\s*m\)\s*\{(.*?)\}", re.S)
    for path in sorted((CSRC / device).iterdir()):
        if path.suffix in (".cpp", ".cu"):
            for block in pattern.findall(path.read_text()):
                found |= set(re.findall(r'm\.impl\("([A-Za-z0-9_]+)"', block))
    return found


@pytest.mark.parametrize("device", sorted(ops.NATIVE_KERNELS))
def test_native_kernels_in_the_sources_are_the_declared_ones(device: str) -> None:
    declared = set(ops.NATIVE_KERNELS[device])
    assert _registered_in_source(device) == declared
    assert declared <= set(ops.SCHEMAS)


def test_cpu_dispatcher_has_exactly_the_declared_native_kernels() -> None:
    if not backends.status("cpp").available:
        pytest.skip("C++ kernels unavailable here")
    for name in _agoq_ops():
        has = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
        assert has == (name.split("::")[1] in ops.NATIVE_KERNELS["cpu"]), name


_INTERPRETED_OPS = """
import torch
from agoq_ds.quant import dequantize, quantize, reference, triton_backend as tb
from agoq_ds.quant.fused import dequantize_add_, requantize_add_

x = torch.randn(3000)
for bits, symmetric in ((8, True), (4, True), (2, False)):
    r = reference.quantize(x, bits, 128, symmetric, False, 0, torch.float32)
    c, s, z = torch.ops.agoq.quantize_triton(x, bits, 128, symmetric, False, 0, torch.float32)
    assert torch.equal(c, r[0]) and torch.equal(s, r[1]) and (z.numel() == 0 if symmetric else torch.equal(z, r[2]))
    out = torch.ops.agoq.dequantize_triton(c, s, z, bits, 128, x.numel(), torch.float32)
    assert torch.equal(out, reference.dequantize(*r, bits, 128, x.numel(), torch.float32))
    assert torch.equal(out, tb.dequantize(c, s, z if not symmetric else None, bits, 128, x.numel(), torch.float32))

# The public API with backend="triton" (Kernels("triton") picks Triton for CUDA tensors only).
def make(name):
    def step(x, acc, codes, scales):
        q = quantize(x, 8, 64, backend=name)
        dequantize_add_(acc, q, backend=name)
        requantize_add_(codes, scales, x, has_value=True, group_size=64, stochastic=False, seed=1, backend=name)
        return dequantize(q, backend=name) * 2

    return step

base = quantize(torch.randn(3000), 8, 64, backend="torch")
inputs = (x, torch.randn(3000), base.codes.clone(), base.scales.clone())
want = [t.clone() for t in inputs]
want_out = make("triton")(*want)
got = [t.clone() for t in inputs]
got_out = torch.compile(make("triton"), fullgraph=True, backend="aot_eager")(*got)
assert torch.equal(got_out, want_out)
assert all(torch.equal(g, w) for g, w in zip(got, want))
ref = [t.clone() for t in inputs]
assert torch.equal(make("torch")(*ref), want_out)  # round-to-nearest: bit-exact with the reference
assert all(torch.equal(g, w) for g, w in zip(ref, want))
print("ok")
"""


def test_triton_ops_in_the_interpreter() -> None:
    """``agoq::quantize_triton``/``dequantize_triton`` run in Triton's CPU interpreter, match the
    reference bit for bit, and the public API on them (fused ops included) compiles without breaks."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETED_OPS], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]
