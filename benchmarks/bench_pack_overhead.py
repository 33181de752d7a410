"""Python overhead of agoq's saved-tensor path, per saved tensor, with the kernels taken out (issue 12).

On a GPU the quantize/dequantize kernels are asynchronous; what the host spends around them (module
hooks, the op watcher, holders, accounting) is what can make a step CPU-bound. This measures it on the
CPU: the same HF LLaMA forward + backward, stock and with agoq's ``ActivationQuantizer`` whose kernels
are replaced by allocation-only stand-ins (quantize returns empty codes, dequantize an uninitialised
tensor of the right shape), in alternating rounds; the difference of the median times divided by the
number of tensors saved per forward (after deduplication, from agoq's ledger) is the overhead per
saved tensor (pack + unpack). Target (issue 12): <= 15 us.

    python benchmarks/bench_pack_overhead.py                 # tiny LLaMA, seq 16: compute stays small
    python benchmarks/bench_pack_overhead.py --model small --seq-len 32 --out results/pack_overhead.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from _machine import machine_info, write_results  # noqa: E402

from agoq_ds.activation import ActivationQuantizer  # noqa: E402
from agoq_ds.activation import storage as storage_module  # noqa: E402
from agoq_ds.config import ActivationConfig  # noqa: E402
from agoq_ds.models import build_llama  # noqa: E402
from agoq_ds.quant import QuantizedTensor  # noqa: E402

_EMPTY_CODES = torch.empty(0, dtype=torch.uint8)
_EMPTY_SCALES = torch.empty(0)


def _quantize_stand_in(x, bits, group_size, **_):
    return QuantizedTensor(_EMPTY_CODES, _EMPTY_SCALES, None, x.shape, x.dtype, bits, group_size)


def _dequantize_stand_in(q):
    return torch.empty(q.shape, dtype=q.dtype)


def _step(model, batch) -> None:
    model(input_ids=batch, labels=batch).loss.backward()
    model.zero_grad(set_to_none=True)


def measure(args: argparse.Namespace) -> dict:
    """Median step time stock and agoq (kernels stubbed), saved tensors per forward, overhead per tensor."""
    torch.set_num_threads(1)
    model = build_llama(args.model, seed=0)
    batch = torch.randint(0, 256, (args.batch, args.seq_len))
    quantizer = ActivationQuantizer(model, ActivationConfig(min_numel=0))
    real = storage_module.quantize, storage_module.dequantize
    storage_module.quantize, storage_module.dequantize = _quantize_stand_in, _dequantize_stand_in
    try:
        quantizer.install()
        _step(model, batch)  # traced forward
        quantizer.on_step_end()
        _step(model, batch)
        saved = quantizer.engine.ledger.forwards[-1].tensors
        quantizer.on_step_end()
        quantizer.remove()
        times: dict[str, list[float]] = {"stock": [], "agoq": []}
        for _ in range(args.rounds):
            for variant in ("stock", "agoq"):
                if variant == "agoq":
                    quantizer.install()
                start = time.perf_counter()
                _step(model, batch)
                times[variant].append(time.perf_counter() - start)
                if variant == "agoq":
                    quantizer.on_step_end()
                    quantizer.remove()
    finally:
        storage_module.quantize, storage_module.dequantize = real
    stock, agoq = statistics.median(times["stock"]), statistics.median(times["agoq"])
    return {
        "machine": machine_info(),
        "model": args.model,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "stock_step_ms": stock * 1e3,
        "agoq_step_ms": agoq * 1e3,
        "saved_tensors_per_forward": saved,
        "overhead_us_per_saved_tensor": (agoq - stock) / saved * 1e6 if saved else float("nan"),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "pack_overhead.json")
    result = measure(p.parse_args(argv))
    write_results(result, p.parse_args(argv).out, None)
    print(
        f"stock {result['stock_step_ms']:.2f} ms, agoq (kernels stubbed) {result['agoq_step_ms']:.2f} ms, "
        f"{result['saved_tensors_per_forward']} saved tensors: "
        f"{result['overhead_us_per_saved_tensor']:.1f} us of Python per saved tensor (target <= 15)"
    )
    return result


if __name__ == "__main__":
    main()
