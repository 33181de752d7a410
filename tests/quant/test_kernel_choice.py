"""The kernel choice is per engine: ``agoq.kernel_backend`` reaches the gradient store, its
accumulators and reductions as a ``quant.Kernels``, and building an engine leaves the process
default alone (stochastic draws differ between the C++ kernels and the reference, so they show
which backend ran)."""

from __future__ import annotations

import pytest
import torch

from agoq_ds import quant
from agoq_ds.config import parse_agoq_config
from agoq_ds.gradient.collectives import reduction_args
from agoq_ds.gradient.store import GradientStore


@pytest.fixture(autouse=True)
def _cpp_kernels():
    if not quant.backends.status("cpp").available:
        pytest.skip("C++ kernels unavailable here")


def _store(choice: str, error_feedback: bool) -> GradientStore:
    config = parse_agoq_config({"kernel_backend": choice, "gradient": {"error_feedback": error_feedback}})
    return GradientStore(config, host="test", rank=0, world_size=1, device="cpu")


@pytest.mark.parametrize("error_feedback", [False, True])  # the fused requantization / quantize + residual
def test_each_store_accumulates_with_its_engines_kernels(error_feedback: bool) -> None:
    before = quant.backends.preferred()
    values = torch.randn(3, 5000)
    codes = {}
    for choice in ("cpp", "torch", "auto"):
        store = _store(choice, error_feedback)
        assert store.kernels is quant.kernels_for(choice)
        acc = store.add_per_step("bucket", 5000)
        assert acc.kernels is store.kernels
        for step, v in enumerate(values):
            acc.add_(v, seed=step)
        codes[choice] = acc.codes.clone()
    assert not torch.equal(codes["cpp"], codes["torch"])
    assert torch.equal(codes["auto"], codes["cpp"])  # auto picks the C++ kernels on a CPU
    assert quant.backends.preferred() == before


def test_reductions_take_the_stores_kernels() -> None:
    store = _store("torch", False)
    args = reduction_args(store.gradient, scale=1.0, seed=1, counter=store.accounting.comm, kernels=store.kernels)
    assert args["kernels"] is store.kernels


def test_an_engine_config_check_leaves_the_process_default_alone() -> None:
    from agoq_ds.deepspeed.engine import AgoqEngineMixin

    before = quant.backends.preferred()
    AgoqEngineMixin._agoq_check_before_build(
        {}, parse_agoq_config({"kernel_backend": "torch", "gradient": {"enabled": False}})
    )
    assert quant.backends.preferred() == before


def test_activations_are_stored_with_their_quantizers_kernels() -> None:
    """Two activation quantizers in one process, ``torch`` and ``cpp``: each forward and backward runs
    its own quantizer's ops (``agoq::quantize_reference`` / ``agoq::quantize``), whatever the other."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from agoq_ds.activation import ActivationQuantizer
    from agoq_ds.config import ActivationConfig
    from agoq_ds.testing.models import build_llama

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "agoq":
                self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    ids = torch.randint(0, 200, (1, 16))
    seen = {}
    for choice in ("torch", "cpp"):
        model = build_llama("tiny", seed=0)
        ActivationQuantizer(model, ActivationConfig(min_numel=0), kernels=quant.kernels_for(choice)).install()
        model(input_ids=ids, labels=ids).loss.backward()  # traced: quantized when the forward returns
        with Ops() as ops:
            model(input_ids=ids, labels=ids).loss.backward()
        seen[choice] = ops.names
    assert {"quantize_reference", "dequantize_reference"} <= seen["torch"], seen
    assert not {"quantize", "dequantize"} & seen["torch"], seen
    assert {"quantize", "dequantize"} <= seen["cpp"] and not {"quantize_reference"} & seen["cpp"], seen
