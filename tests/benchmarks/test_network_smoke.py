"""benchmarks/network.py runs end to end on its --quick setting: two ranks in two network namespaces
over a 1 Gbit/s veth link, stock DeepSpeed ZeRO-2 and agoq, and the bytes on the link match the
collective meter. Needs root (``ip netns``); skipped with the reason where namespaces are not allowed."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.benchmark_scripts import load_benchmark

netns = load_benchmark("_netns")
AVAILABLE, WHY = netns.netns_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"network namespaces unavailable: {WHY}")


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=15).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_veth_pair_shapes_and_cleans_up() -> None:
    with netns.VethPair(subnet=7) as pair:
        assert set(pair.ns) <= _namespaces()
        pair.shape(netns.Link(rate_mbit=200))
        assert "tbf" in pair.qdiscs(0) and "200Mbit" in pair.qdiscs(1)
        mbit = pair.probe_mbit(4_000_000)
        assert 100 < mbit < 230  # shaped to 200 Mbit/s (TCP goodput a few % below)
        assert pair.counters(0)["tx_bytes"] >= 4_000_000
    assert not set(pair.ns) & _namespaces()  # removed with the veth and its qdiscs


@pytest.mark.slow
def test_network_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_benchmark("network")
    out = tmp_path / "net.json"
    result = bench.main(["--quick", "--out", str(out), "--log-dir", str(tmp_path / "logs")])
    printed = capsys.readouterr().out
    assert "1 Gbit/s" in printed and "link probe" in printed
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert out.with_suffix(".png").stat().st_size > 0
    assert not {f"{netns.PREFIX}{os.getpid()}{s}" for s in "ab"} & _namespaces()
    assert len(data["meta"]["loadavg_start"]) == 3
    runs = {r["variant"]: r for r in data["runs"]}
    assert set(runs) == {"stock", "agoq"}
    for r in runs.values():
        assert r["ok"], r["error"]
        assert len(r["step_time_s"]) == 4 and r["median_step_s"] > 0
        # Traffic really crossed the veth: rank 0's frames per step match the meter's model of the
        # collectives (within headers, the scalar loss all-reduce and the held-out loss).
        assert r["link_tx_bytes_per_step"] == pytest.approx(r["meter_bytes_per_step"], rel=0.1)
        assert r["link_rx_bytes_per_step"] == pytest.approx(r["meter_bytes_per_step"], rel=0.1)
    assert runs["stock"]["engine"] != runs["agoq"]["engine"]
    assert runs["agoq"]["link_tx_bytes_per_step"] < 0.6 * runs["stock"]["link_tx_bytes_per_step"]
    row = data["summary"][0]
    assert row["agoq"]["ratio_vs_stock"] == pytest.approx(row["agoq"]["median_step_s"] / row["stock"]["median_step_s"])
    assert data["verdict"]["ratio_at_1gbit"] == row["agoq"]["ratio_vs_stock"]
