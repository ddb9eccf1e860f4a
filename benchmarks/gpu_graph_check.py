"""CUDA-graph capture and replay of token_stats forward + backward, per GPU backend.

    python benchmarks/gpu_graph_check.py [--shape 4096x151936] [--dtype bf16] [--temperature 0.7]

For each GPU backend of token_stats ("triton", "cuda"): one training step (forward, a loss of
logprob, entropy and collision with random row weights, the gradient w.r.t. the logits) is
warmed up on a side stream, captured into a torch.cuda.CUDAGraph, and replayed. Checks:
  1. the replay equals an eager run bitwise (every output and the gradient);
  2. after new data is copied into the captured input buffers, a replay equals an eager run on
     that data bitwise (the graph reads its inputs, it did not bake them in);
and times eager steps and replays (CUDA events, median of 20). Exits 1 when a check fails or a
GPU backend cannot run. Without a GPU (a dry run) it runs the step eagerly twice on CPU with
the C++ backend, checks that the runs agree bitwise, and says that capture was skipped.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `pg_kernels` importable from the tree
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pg_kernels  # noqa: E402
from pg_kernels import _backend  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FIELDS = ("logprob", "entropy", "collision", "lgp", "lse", "max_prob", "argmax")


def make_step(backend: str, inputs: dict[str, torch.Tensor], temperature: float):
    """One training step over the (static) input buffers; returns outputs + gradient."""

    def step() -> dict[str, torch.Tensor]:
        x = inputs["logits"]
        out = pg_kernels.token_stats(x, inputs["labels"], temperature=temperature, backend=backend)
        w = inputs["w"]
        loss = (w[0] * out.logprob + w[1] * out.entropy + w[2] * out.collision).sum()
        (grad,) = torch.autograd.grad(loss, x)
        return {**{f: getattr(out, f) for f in FIELDS}, "grad": grad}

    return step


def fresh_inputs(n: int, v: int, dtype: torch.dtype, device: torch.device, seed: int):
    """Random logits [n, v] drawn on the device (N(0, 9) plus a per-row offset), labels with
    some ignored rows, loss weights; never zeros."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(n, v, generator=g, device=device) * 3
    logits += torch.randn(n, 1, generator=g, device=device) * 5
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    labels[:: max(1, n // 7)] = -100
    return {
        "logits": logits.to(dtype).requires_grad_(True),
        "labels": labels,
        "w": torch.randn(3, n, generator=g, device=device),
    }


def load_into(static: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, t in new.items():
            static[k].copy_(t)


def diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that are not bitwise equal (NaN equal to NaN)."""
    bad = []
    for k in a:
        x, y = a[k].detach(), b[k].detach()
        same = x.shape == y.shape and x.dtype == y.dtype
        if same and x.is_floating_point():
            same = bool(((x == y) | (x.isnan() & y.isnan())).all())
        elif same:
            same = torch.equal(x, y)
        if not same:
            bad.append(k)
    return bad


def time_ms(fn, reps: int = 20) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check_backend(backend: str, n: int, v: int, dtype, temperature: float) -> list[str]:
    device = torch.device("cuda")
    static = fresh_inputs(n, v, dtype, device, seed=1)
    step = make_step(backend, static, temperature)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles Triton kernels) outside capture
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    failures = []
    eager = step()
    graph.replay()
    torch.cuda.synchronize()
    if bad := diff(captured, eager):
        failures.append(f"{backend}: replay differs from eager in {bad}")
    load_into(static, {k: t.detach() for k, t in fresh_inputs(n, v, dtype, device, 2).items()})
    eager = step()
    graph.replay()
    torch.cuda.synchronize()
    if bad := diff(captured, eager):
        failures.append(f"{backend}: replay on new data differs from eager in {bad}")
    eager_ms, replay_ms = time_ms(step), time_ms(graph.replay)
    elems = n * v
    print(
        f"{backend:6s} {n}x{v} {str(dtype).removeprefix('torch.')} T={temperature:g}: "
        f"eager step {eager_ms:.3f} ms, graph replay {replay_ms:.3f} ms "
        f"({elems * dtype.itemsize * 3 / replay_ms / 1e6:.0f} GB/s counting 2 reads + 1 write)"
        f" {'FAIL' if failures else 'bitwise equal'}",
        flush=True,
    )
    del graph
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="4096x151936", help="NxV")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args(argv)
    n, v = (int(s) for s in args.shape.lower().split("x"))
    dtype = DTYPES[args.dtype]
    if not torch.cuda.is_available():
        inputs = fresh_inputs(n, v, dtype, torch.device("cpu"), seed=1)
        step = make_step("cpu", inputs, args.temperature)
        bad = diff(step(), step())
        print(f"no GPU: graph capture skipped; CPU step twice at {n}x{v}: "
              f"{'differs in ' + str(bad) if bad else 'bitwise equal'}")  # fmt: skip
        return 1 if bad else 0
    failures = []
    for backend in ("triton", "cuda"):
        why = _backend.unavailable_reason(backend, torch.device("cuda"))
        if why is not None:
            failures.append(f"{backend}: cannot run: {why}")
            continue
        try:
            failures += check_backend(backend, n, v, dtype, args.temperature)
        except Exception as e:  # noqa: BLE001 (report, go on with the other backend)
            failures.append(f"{backend}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    for f in failures:
        print(f"FAIL {f}")
    print(f"gpu_graph_check: {'FAIL' if failures else 'ok'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
