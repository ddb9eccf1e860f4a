"""benchmarks/fidelity.py (the README's fidelity table) runs end to end at a small size."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(out, *args):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "fidelity.py"), "--rows", "4",
         "--vocab", "100", "--out", str(out), *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "fidelity.json").read_text())["records"]


@pytest.mark.slow
def test_fidelity_script_small(tmp_path):
    records = _run(tmp_path)
    ops = {r["op"] for r in records}
    assert ops == {"token_stats", "kl_divergence", "mismatch_stats", "topk_kl", "pruned_logprob"}
    # Every (op, dtype, temperature) measured, each record with a finite pg_kernels error.
    cases = {(r["dtype"], r["temperature"]) for r in records}
    assert cases == {(d, t) for d in ("fp32", "bf16") for t in (1.0, 0.7)}
    assert all(0 <= r["pg_kernels"]["abs"] < 1 for r in records), records
    assert "| token_stats | fp32 | 1 | logprob |" in (tmp_path / "fidelity.md").read_text()


@pytest.mark.slow
def test_fidelity_script_ops_subset(tmp_path):
    """--ops measures those ops only, on the same inputs as a full run (as a CUDA run of
    token_stats alone needs)."""
    full = {(r["op"], r["dtype"], r["temperature"], r["quantity"]): r for r in _run(tmp_path)}
    part = _run(tmp_path, "--ops", "kl_divergence")
    assert part and {r["op"] for r in part} == {"kl_divergence"}
    for r in part:
        assert r == full[(r["op"], r["dtype"], r["temperature"], r["quantity"])]
