"""``kernel_backend: "auto"``: the per-op, per-width table is measured once per machine and cached."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch

from agoq_ds.quant import autotune, backends


def _backend(delay: dict[str, float]) -> SimpleNamespace:
    """A stand-in backend (the reference's results) that takes ``delay[op/bits]`` extra seconds."""
    ref = backends.get("torch")

    def quantize(x, bits, *args):
        time.sleep(delay.get(f"quantize/{bits}", 0.0))
        return ref.quantize(x, bits, *args)

    def dequantize(codes, scales, zeros, bits, *args):
        time.sleep(delay.get(f"dequantize/{bits}", 0.0))
        return ref.dequantize(codes, scales, zeros, bits, *args)

    return SimpleNamespace(quantize=quantize, dequantize=dequantize)


def test_fastest_per_op_and_width_measured_once_then_read_from_the_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("AGOQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "PROBE_NUMEL", {"cpu": 4096})
    monkeypatch.setattr(autotune, "REPEATS", 2)
    monkeypatch.setattr(autotune, "CALLS_PER_BATCH", 2)
    slow = 0.01
    fast_at_8 = _backend({"quantize/2": slow, "quantize/4": slow, "dequantize/2": slow, "dequantize/4": slow})
    fast_below_8 = _backend({"quantize/8": slow, "dequantize/8": slow})
    candidates = {"a": fast_at_8, "b": fast_below_8}
    cpu = torch.device("cpu")
    picked = autotune.choices(cpu, candidates)
    assert picked == {
        "quantize/2": "b",
        "dequantize/2": "b",
        "quantize/4": "b",
        "dequantize/4": "b",
        "quantize/8": "a",
        "dequantize/8": "a",
    }
    record = json.loads(autotune.cache_path(cpu).read_text())
    assert record["choices"] == picked and record["candidates"] == ["a", "b"]
    assert record["seconds"]["quantize/2"]["a"] >= slow > record["seconds"]["quantize/2"]["b"]

    def no_measuring(*_):
        raise AssertionError("the cached table should have been used")

    monkeypatch.setattr(autotune, "measure", no_measuring)
    assert autotune.choices(cpu, candidates) == picked
    with pytest.raises(AssertionError, match="cached table"):  # other candidates: measured again
        autotune.choices(cpu, {"a": fast_at_8})


def test_time_per_call_times_batches_of_back_to_back_calls(monkeypatch) -> None:
    """One warm-up call, then ``repeats`` batches of ``calls`` calls each timed as a whole: per-call
    launch and synchronisation overhead is spread over the batch instead of timed with every call."""
    clock = iter(range(0, 10_000, 1))
    reads: list[int] = []

    def fake_clock() -> float:
        reads.append(1)
        return float(next(clock))

    calls = []
    monkeypatch.setattr(autotune.time, "perf_counter", fake_clock)
    seconds = autotune.time_per_call(lambda: calls.append(1), torch.device("cpu"), repeats=3, calls=20)
    assert len(calls) == 1 + 3 * 20
    assert len(reads) == 2 * 3  # the clock is read around each batch, never around a single call
    assert seconds == 1 / 20


def test_a_table_timed_by_another_method_is_measured_again(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("AGOQ_CACHE_DIR", str(tmp_path))
    cpu = torch.device("cpu")
    path = autotune.cache_path(cpu)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"candidates": ["a", "b"], "choices": {"quantize/8": "b"}, "method": 1}))
    measured = []
    monkeypatch.setattr(
        autotune, "measure", lambda device, c: measured.append(1) or {"quantize/8": {"a": 1.0, "b": 2.0}}
    )
    assert autotune.choices(cpu, {"a": None, "b": None}) == {"quantize/8": "a"}
    assert measured and json.loads(path.read_text())["method"] == autotune.METHOD


def test_reference_never_competes(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(autotune, "choices", lambda device, candidates: calls.append(candidates) or {})
    name = backends.Kernels("auto").select(torch.device("cpu"), "dequantize", 2)  # a fresh choice: nothing cached
    assert name == ("cpp" if backends.status("cpp").available else "torch")
    assert not calls  # one compiled CPU backend: nothing to measure, the reference is no contender
