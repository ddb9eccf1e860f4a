"""benchmarks/fidelity.py (the README's fidelity table) runs end to end at a small size."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_fidelity_script_small(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "fidelity.py"), "--rows", "4",
         "--vocab", "100", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((tmp_path / "fidelity.json").read_text())["records"]
    ops = {r["op"] for r in records}
    assert ops == {"token_stats", "kl_divergence", "mismatch_stats", "topk_kl", "pruned_logprob"}
    # Every (op, dtype, temperature) measured, each record with a finite pg_kernels error.
    cases = {(r["dtype"], r["temperature"]) for r in records}
    assert cases == {(d, t) for d in ("fp32", "bf16") for t in (1.0, 0.7)}
    assert all(0 <= r["pg_kernels"]["abs"] < 1 for r in records), records
    assert "| token_stats | fp32 | 1 | logprob |" in (tmp_path / "fidelity.md").read_text()
