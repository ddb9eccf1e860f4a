"""Benchmark of pg_kernels.parallel (vocab-parallel token_stats and kl_divergence) on CPU.

    python benchmarks/bench_parallel.py [--shape NxV] [--dtype fp32|bf16] [--reps R]
        [--world W] [--out benchmarks/out]

Spawns W gloo ranks on localhost (default 2), one thread each, each holding logits
[N, V / W]; times the parallel op (fwd and fwd+bwd, backend "cpu") against the single-device
op on the full [N, V] logits in this process with 1 thread and with W threads (the same cores
as the group). Also measures the communication volume: the bytes each rank hands to the one
all-gather per call (recorded by wrapping the collective), per row.

Timing: the harness's adaptive loop (time-based warm-up and repetition counts) cannot drive a
collective op: ranks would pick different counts and the last all-gather would wait forever.
Here every rank runs the same fixed count, with a barrier before each repetition; a row's
time is the median over repetitions of the slowest rank. A shared 2-core machine makes the
numbers noisy: each row carries the 1-minute load average at its start.

Outputs: a markdown table on stdout and `<out>/parallel_cpu.{json,md}` with device, versions
and git SHA (benchmarks/harness.py conventions).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `pg_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pg_kernels
from benchmarks import harness
from pg_kernels import parallel
from pg_kernels.parallel import _shard

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WARMUP = 2


def _inputs(n: int, v: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, v, generator=g) * 2).to(dtype)
    xr = (x.float() + torch.randn(n, v, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    w = torch.randn(3, n, generator=g)
    return x, xr, labels, w


def _step(op: str, mode: str, x, xr, labels, w, **kw):
    """One call of the op (and its backward for fwd+bwd)."""
    if mode == "fwd+bwd":
        x = x.detach().requires_grad_()
    if op == "token_stats":
        fn = kw.pop("fn", pg_kernels.token_stats)
        out = fn(x, labels, **kw)
        loss = (w[0] * out.logprob + w[1] * out.entropy + w[2] * out.collision).sum()
    else:
        fn = kw.pop("fn", pg_kernels.kl_divergence)
        loss = (w[0] * fn(x, xr, **kw)).sum()
    if mode == "fwd+bwd":
        torch.autograd.grad(loss, [x])


def _check(op: str, fn, lx, lxr, x, xr, labels, start: int) -> None:
    """The parallel op's forward on this rank's shard against the single-device op on the whole
    rows, before anything is timed (test_parallel checks it against float64, gradients too)."""
    kw = {"vocab_start_index": start, "backend": "cpu"}
    if op == "token_stats":
        got, want = fn(lx, labels, **kw), pg_kernels.token_stats(x, labels, backend="cpu")
        pairs = [(getattr(got, f), getattr(want, f)) for f in ("logprob", "entropy", "collision")]
    else:
        pairs = [(fn(lx, lxr, **kw), pg_kernels.kl_divergence(x, xr, backend="cpu"))]
    for got_f, want_f in pairs:
        torch.testing.assert_close(got_f, want_f, rtol=1e-5, atol=1e-6, msg=lambda m: f"{op}: {m}")


def _time(fn, reps: int, barrier=None) -> list[float]:
    times = []
    for i in range(WARMUP + reps):
        if barrier is not None:
            barrier()
        t0 = time.perf_counter()
        fn()
        if i >= WARMUP:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _worker(rank: int, world: int, args: dict, folder: str) -> None:
    torch.set_num_threads(1)
    # a file rendezvous: a TCP port probed free can be taken before rank 0 listens on it
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world)  # fmt: skip
    sent = []
    gather = _shard._all_gather

    def recording(out, payload, group=None):
        sent.append(payload.numel() * payload.element_size())
        return gather(out, payload, group=group)

    _shard._all_gather = recording
    try:
        n, v = args["N"], args["V"]
        x, xr, labels, w = _inputs(n, v, DTYPES[args["dtype"]])
        size = v // world
        start = rank * size
        end = v if rank == world - 1 else start + size
        lx, lxr = x[:, start:end].contiguous(), xr[:, start:end].contiguous()
        out = {}
        for op in ("token_stats", "kl_divergence"):
            fn = parallel.token_stats if op == "token_stats" else parallel.kl_divergence
            _check(op, fn, lx, lxr, x, xr, labels, start)
            for mode in ("fwd", "fwd+bwd"):
                sent.clear()
                _step(op, mode, lx, lxr, labels, w, fn=fn, vocab_start_index=start, backend="cpu")
                per_call = sent[0]
                step = functools.partial(
                    _step, op, mode, lx, lxr, labels, w, fn=fn, vocab_start_index=start,
                    backend="cpu",
                )  # fmt: skip
                times = _time(step, args["reps"], dist.barrier)
                calls = len(sent) / (1 + WARMUP + args["reps"])
                out[(op, mode)] = {"times": times, "bytes_per_call": per_call, "calls": calls}
        torch.save(out, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark pg_kernels.parallel on CPU (gloo).")
    parser.add_argument("--shape", default="256x32000", metavar="NxV")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--out", default=str(harness.REPO_ROOT / "benchmarks" / "out"))
    a = parser.parse_args(argv)
    n, v = (int(s) for s in a.shape.split("x"))
    args = {"N": n, "V": v, "dtype": a.dtype, "reps": a.reps}
    records = []
    x, xr, labels, w = _inputs(n, v, DTYPES[a.dtype])
    for op in ("token_stats", "kl_divergence"):
        for mode in ("fwd", "fwd+bwd"):
            for threads in (1, a.world):
                torch.set_num_threads(threads)
                load = os.getloadavg()[0]
                step = functools.partial(_step, op, mode, x, xr, labels, w, backend="cpu")
                times = _time(step, a.reps)
                records.append({"op": op, "mode": mode, "provider": f"single, {threads} thread(s)",
                                "times_ms": times, "load_1min": load})  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="pgk-bench-parallel-") as folder:
        load = os.getloadavg()[0]
        mp.spawn(_worker, args=(a.world, args, folder), nprocs=a.world)
        ranks = [torch.load(Path(folder) / f"rank{r}.pt") for r in range(a.world)]
    for (op, mode), rec in ranks[0].items():
        slowest = [max(r[(op, mode)]["times"][i] for r in ranks) for i in range(a.reps)]
        records.append({
            "op": op, "mode": mode, "provider": f"parallel, {a.world} gloo ranks x 1 thread",
            "times_ms": slowest, "load_1min": load,
            "allgather_calls": rec["calls"],
            "bytes_sent_per_row": rec["bytes_per_call"] / n,
            "bytes_received_per_row": a.world * rec["bytes_per_call"] / n,
        })  # fmt: skip
    sha, dirty = harness.git_state()
    meta = {"device": harness.device_name(torch.device("cpu")), "versions": harness.versions(),
            "git_sha": sha, "git_dirty": dirty, "shape": {"N": n, "V": v}, "dtype": a.dtype,
            "world": a.world, "reps": a.reps}  # fmt: skip
    lines = [
        f"pg_kernels.parallel, {n}x{v} {a.dtype}, CPU ({meta['device']}), "
        f"{a.world} gloo ranks; git {sha and sha[:10]}{' (dirty)' if dirty else ''}",
        "",
        "| op | mode | provider | median ms | min-max ms | all-gathers / call | bytes/row sent "
        "(received) | load |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        t = r["times_ms"]
        comm = (
            f"{r['bytes_sent_per_row']:.1f} ({r['bytes_received_per_row']:.1f})"
            if "bytes_sent_per_row" in r
            else "-"
        )
        lines.append(
            f"| {r['op']} | {r['mode']} | {r['provider']} | {statistics.median(t):.2f} | "
            f"{min(t):.2f}-{max(t):.2f} | {r.get('allgather_calls', '-')} | {comm} | "
            f"{r['load_1min']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "parallel_cpu.md").write_text(table + "\n")
    (out / "parallel_cpu.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
