"""The benchmark harness (benchmarks/harness.py) end to end at small sizes, on CPU."""

import json
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_check_compares_a_shared_weight_gradient_whole(tmp_path):
    """token_stats_from_hidden fwd+bwd with every row checked (N = 64 < V): the weight's
    gradient [V, D] is compared whole with its float64 truth. It was cut to the checked rows'
    count, [64, D], against a [256, D] truth: every provider FAILED with an error of inf
    (the CPU `--quick` default, 1024 x 32000 x 1024, met it). token_loss_from_hidden's two
    orders too (the loss fused)."""
    ours = ("pg_kernels:cpu", "token_loss:cpu", "token_loss_vocab:cpu")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_token_stats_from_hidden.py"),
         "--device", "cpu", "--shapes", "64x256x32", "--dtypes", "fp32", "--modes", "fwd+bwd",
         "--providers", *ours, "eager", "--max-wait", "0", "--out", str(tmp_path),
         "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((tmp_path / "token_stats_from_hidden_cpu.json").read_text())["records"]
    checked = [r for r in records if r["provider"] in ours]
    assert len(checked) == 3 and all(r["status"] == "ok" for r in checked), checked
    for r in checked:
        errs = r["check"]["rel_err"]
        assert 0 <= errs["grad:weight"] < 1e-5, (r["provider"], errs)


def test_kl_divergence_from_hidden_benchmark_checks_both_orders(tmp_path):
    """bench_kl_divergence_from_hidden at a small size: both orders' KL and gradients, and
    kl_loss_from_hidden's in both of its orders, pass the float64 check (the benchmark's
    wiring; at V = 300 the default order has one block, and the orders' agreement over several
    is test_from_hidden's)."""
    ours = ("pg_kernels:cpu", "rows:cpu", "kl_loss:cpu", "kl_loss_vocab:cpu")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_kl_divergence_from_hidden.py"),
         "--device", "cpu", "--shapes", "64x300x32", "--dtypes", "fp32", "--modes", "fwd+bwd",
         "--providers", *ours, "eager", "--max-wait", "0", "--out", str(tmp_path),
         "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    path = tmp_path / "kl_divergence_from_hidden_cpu.json"
    records = json.loads(path.read_text())["records"]
    ours = [r for r in records if r["provider"] in ours]
    assert len(ours) == 4 and all(r["status"] == "ok" for r in ours), ours
    for r in ours:
        errs = r["check"]["rel_err"]
        assert 0 <= errs["kl"] < 1e-5 and 0 <= errs["grad:weight"] < 1e-5, (r["provider"], errs)


def _gpu_script_benchmarks():
    """(op, [provider names]) of each literal `bench_step` of benchmarks/gpu_check.sh's GPU
    branch (after the dry run's), continuation lines joined; names holding a variable left
    out."""
    script = open(os.path.join(ROOT, "benchmarks", "gpu_check.sh")).read().replace("\\\n", " ")
    benchmarks = script[script.rindex("\nelif [[ $DRY == 1 ]]") :]  # the benchmarks' branches
    gpu_branch = benchmarks[benchmarks.index("\nelse\n") :]
    steps = []
    for line in gpu_branch.splitlines():
        code = line.split("#", 1)[0]
        words = shlex.split(code.split("bench_step ", 1)[1]) if "bench_step " in code else []
        if len(words) >= 6 and not words[2].startswith("$"):  # NAME MAX OP TEMP TAG PROVIDERS
            steps.append((words[2], [p for p in words[5].split() if "$" not in p]))
    return steps


def test_gpu_script_names_only_providers_its_benchmarks_have():
    """Every provider a GPU step of gpu_check.sh names exists in that benchmark on CUDA (an
    unknown name is only noted by the harness, and the step would time nothing for it: a typo
    would cost a scarce GPU run). Built for a CUDA device without one: building a provider
    list needs no GPU."""
    import importlib

    import torch

    steps = _gpu_script_benchmarks()
    assert len(steps) >= 8 and any(op == "token_stats_from_hidden" for op, _ in steps), steps
    for op, names in steps:
        bench = importlib.import_module(f"benchmarks.bench_{op}").make_bench(torch.device("cuda"))
        known = {p.name for p in bench.providers}
        assert set(names) <= known, (op, sorted(set(names) - known))


def _harness():
    sys.path.insert(0, ROOT)
    from benchmarks import bench_token_stats_from_hidden, harness

    return harness, bench_token_stats_from_hidden


def test_target_cells_mark_load_and_never_round_onto_the_bound():
    """A verdict's row timed under load carries the tables' '*'; a value that two decimals would
    round onto its bound (1.0504 against <= 1.05 read "1.05 ❌") takes three."""
    harness, _ = _harness()
    at_most = harness.Target("fwd / amax ≤ 1.05", "fwd", "ceiling:amax", at_most=1.05)
    loaded = {"speedup_vs": {"ceiling:amax": 1 / 1.0504}, "other_load": 1.6}
    assert at_most.cell(loaded) == "1.050 ❌ *"
    assert at_most.cell({"speedup_vs": {"ceiling:amax": 1 / 1.2}}) == "1.20 ❌"
    at_least = harness.Target("×eager ≥ 8", "fwd", "eager", at_least=8)
    assert at_least.cell({"speedup_vs": {"eager": 7.996}, "other_load": 0.1}) == "7.996 ❌"


def test_from_hidden_memory_verdict_follows_the_device():
    """The CPU target is 20 % of N·V·4; a GPU provider's is cce's peak at the same dtype (it was
    held to the CPU rule: 1500 MB against cce's 600 read ✅)."""
    _, bench = _harness()
    shape = {"N": 16384, "V": 151936, "D": 4096}

    def rows(*peaks):
        return [dict(mode="fwd+bwd", shape=shape, peak_mem_mb=mb, provider=p, dtype="bf16")
                for p, mb in peaks]  # fmt: skip

    gpu = "\n".join(bench.memory_summary("pg_kernels:triton", shape, rows(
        ("pg_kernels:triton", 1500), ("cce", 600))))  # fmt: skip
    assert "| pg_kernels:triton | bf16 | 1500 | 15.8 ❌ (above cce) |" in gpu
    alone = "\n".join(bench.memory_summary("pg_kernels:triton", shape, rows(
        ("pg_kernels:triton", 500),)))  # fmt: skip
    assert "(no cce row)" in alone
    cpu = "\n".join(bench.memory_summary("pg_kernels:cpu", shape, rows(("pg_kernels:cpu", 1000),)))
    assert "| 10.5 ✅ |" in cpu


def test_results_record_what_changes_a_cpu_timing(monkeypatch):
    """The ISA ATen runs, the C++ build loaded for it, the huge-page mode and the variables that
    move a timing (THP_MEM_ALLOC_ENABLE moved eager's backward 323 -> 104 ms, a 3x x eager)."""
    harness, _ = _harness()
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    env = harness.run_environment()
    assert env["cpu_capability"] and env["pg_kernels_cpu_build"].startswith("pg_kernels._C")
    assert "THP_MEM_ALLOC_ENABLE=1" in env["variables"]
