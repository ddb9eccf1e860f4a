"""The benchmark harness (benchmarks/harness.py) end to end at small sizes, on CPU."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_check_compares_a_shared_weight_gradient_whole(tmp_path):
    """token_stats_from_hidden fwd+bwd with every row checked (N = 64 < V): the weight's
    gradient [V, D] is compared whole with its float64 truth. It was cut to the checked rows'
    count, [64, D], against a [256, D] truth: every provider FAILED with an error of inf
    (the CPU `--quick` default, 1024 x 32000 x 1024, met it)."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_token_stats_from_hidden.py"),
         "--device", "cpu", "--shapes", "64x256x32", "--dtypes", "fp32", "--modes", "fwd+bwd",
         "--providers", "pg_kernels:cpu", "eager", "--max-wait", "0", "--out", str(tmp_path),
         "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((tmp_path / "token_stats_from_hidden_cpu.json").read_text())["records"]
    checked = [r for r in records if r["provider"] == "pg_kernels:cpu"]
    assert checked and all(r["status"] == "ok" for r in checked), checked
    errs = checked[0]["check"]["rel_err"]
    assert 0 <= errs["grad:weight"] < 1e-5, errs


def test_kl_divergence_from_hidden_benchmark_checks_both_orders(tmp_path):
    """bench_kl_divergence_from_hidden at a small size: both orders' KL and gradients pass the
    float64 check (the benchmark's wiring; at V = 300 the default order has one block, and the
    orders' agreement over several is test_from_hidden's)."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_kl_divergence_from_hidden.py"),
         "--device", "cpu", "--shapes", "64x300x32", "--dtypes", "fp32", "--modes", "fwd+bwd",
         "--providers", "pg_kernels:cpu", "rows:cpu", "eager", "--max-wait", "0", "--out",
         str(tmp_path), "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    path = tmp_path / "kl_divergence_from_hidden_cpu.json"
    records = json.loads(path.read_text())["records"]
    ours = [r for r in records if r["provider"] in ("pg_kernels:cpu", "rows:cpu")]
    assert len(ours) == 2 and all(r["status"] == "ok" for r in ours), ours
    for r in ours:
        errs = r["check"]["rel_err"]
        assert 0 <= errs["kl"] < 1e-5 and 0 <= errs["grad:weight"] < 1e-5, (r["provider"], errs)
