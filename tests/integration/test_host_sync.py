"""A steady-state agoq step makes no host synchronisation that stock DeepSpeed does not make.

On a GPU every ``.item()``/``bool(t)``/``nonzero`` blocks the host until the device catches up; a few
hundred per step made agoq's step CPU-bound on an H200 (issue 12). The same Python calls happen on a
CPU, so they are counted here (``host_sync.HostSyncCounter``) over one optimizer step of two
micro-batches on two gloo ranks, after the traced first step, for stock DeepSpeed and ``"agoq": {}``
with the same config, on every gradient host agoq has: stage-0 parameter gradients, the ZeRO-1
``BF16_Optimizer`` path, and the ZeRO-1/2 optimizer in fp32 and bf16.
"""

from __future__ import annotations

import pytest
import torch

from agoq_ds.testing.distributed import run_ranks
from agoq_ds.testing.host_sync import HostSyncCounter
from tests.integration.engine_workers import ds_config, host_syncs_per_step

pytestmark = pytest.mark.slow

CONFIGS = {
    "zero0-fp32": ds_config(0),
    "zero1-bf16-fp32-accum": ds_config(1, bf16=True, data_types={"grad_accum_dtype": "fp32"}),
    "zero1-fp32": ds_config(1),
    "zero2-fp32": ds_config(2),
    "zero2-bf16": ds_config(2, bf16=True),
}


@pytest.fixture(scope="module")
def counts() -> list[dict]:
    configs = {}
    for name, config in CONFIGS.items():
        configs[f"stock/{name}"] = config
        configs[f"agoq/{name}"] = {**config, "agoq": {}}
    return run_ranks(host_syncs_per_step, 2, (configs,))


def test_counter_sees_a_sync() -> None:
    with HostSyncCounter() as syncs:
        _ = torch.ones(3).sum().item(), bool(torch.ones(1)), torch.arange(4).nonzero()
    assert syncs.total == 3


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_no_host_sync_beyond_stock(counts: list[dict], name: str) -> None:
    for rank, result in enumerate(counts):
        stock, agoq = result[f"stock/{name}"], result[f"agoq/{name}"]
        assert agoq["agoq"] and not stock["agoq"]
        extra = {w: n - stock["where"].get(w, 0) for w, n in agoq["where"].items() if n > stock["where"].get(w, 0)}
        assert agoq["total"] <= stock["total"], (
            f"rank {rank}, {name}: agoq {agoq['total']} host syncs per step, stock {stock['total']}; extra: {extra}"
        )
