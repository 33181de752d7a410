"""DeepSpeed's own unit tests with ``"agoq": {}`` added to every config, as a user's CI would run them,
beside the same tests on stock DeepSpeed.

    python scripts/deepspeed_unit_tests.py /path/to/DeepSpeed/tests [--out results/deepspeed_unit.json]

DeepSpeed's tests are not in its wheel: pass the ``tests`` folder of a DeepSpeed source checkout of the
installed release (or the closest). Each test in ``tests/deepspeed_unit/selection.txt`` (ZeRO-1/2/3,
bf16, overflow, tensor-fragment API, checkpoints, ``initialize``) runs twice on CPU ranks (gloo,
``LOCAL_SIZE=4`` so DeepSpeed's harness sees four CPU "devices"): once stock, once with
``AGOQ_INJECT=1``, where ``tests/deepspeed_unit/sitecustomize.py`` (an ordinary post-import hook for
``deepspeed``, installed beside agoq's) adds the block to every config handed to
``deepspeed.initialize``. The table lists each test's outcome both ways and, where agoq's differs,
the first line of agoq's error, so that every failure left can be read as a refusal by name or not.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from agoq_ds.testing.shutdown import remove_cpu_allreduce_buffers, session_start

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "tests" / "deepspeed_unit"
OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")
REASON = re.compile(r"^(?:FAILED|ERROR) (\S+::\S+) - (.*)$")


def run(tests: Path, ids: list[str], inject: bool, timeout: float) -> dict[str, dict[str, str]]:
    """Outcome (and failure line) per test id, one pytest process for the whole selection."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "LOCAL_SIZE": "4", "PYTHONPATH": str(HERE)}
    env["AGOQ_INJECT"] = "1" if inject else "0"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-o", "addopts=", *ids]
    since = session_start()
    try:
        proc = subprocess.run(cmd, cwd=tests, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        remove_cpu_allreduce_buffers(since)  # DeepSpeed's CPU all-reduce leaves one per rank (LOCAL_SIZE)
    text = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)
    out: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        if m := OUTCOME.match(line.strip()):
            out[m.group(1)] = {"outcome": m.group(2)}
        elif (m := REASON.match(line.strip())) and m.group(1) in out:
            out[m.group(1)]["reason"] = m.group(2)[:300]
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run the selection stock and with agoq, print the table, write JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tests", type=Path, help="the tests/ folder of a DeepSpeed source checkout")
    p.add_argument("--selection", type=Path, default=HERE / "selection.txt")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "deepspeed_unit.json")
    p.add_argument("--timeout", type=float, default=5400.0)
    args = p.parse_args(argv)
    ids = [line.strip() for line in args.selection.read_text().splitlines() if line.strip()]
    stock = run(args.tests, ids, inject=False, timeout=args.timeout)
    agoq = run(args.tests, ids, inject=True, timeout=args.timeout)
    rows = []
    for test in ids:
        s, a = stock.get(test, {"outcome": "?"}), agoq.get(test, {"outcome": "?"})
        rows.append({"test": test, "stock": s["outcome"], "agoq": a["outcome"], "agoq_reason": a.get("reason", "")})
        note = f"  {a.get('reason', '')[:140]}" if a["outcome"] != s["outcome"] or a["outcome"] == "FAILED" else ""
        print(f"{s['outcome']:8s} {a['outcome']:8s} {test}{note}")
    counts = {
        k: {o: sum(r[k] == o for r in rows) for o in ("PASSED", "FAILED", "SKIPPED", "ERROR")}
        for k in ("stock", "agoq")
    }
    print(json.dumps(counts))
    selection = args.selection.resolve()
    shown = selection.relative_to(ROOT) if selection.is_relative_to(ROOT) else selection
    result = {"selection": str(shown), "counts": counts, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
