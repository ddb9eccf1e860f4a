"""Host time of each op's forward at N = 1: what a call costs before its kernel matters.

    python benchmarks/host_time.py [--device cpu] [--vocab 64] [--dtype fp32] [--calls 3000]

Calls each op's forward (no grad, one row of --vocab logits) --calls times in a loop, for every
backend that has a kernel for the op on --device, beside `torch.amax` of the same row, and
prints the best of three rounds in microseconds per call. A CUDA round synchronizes once at its
end, so a call's time is the larger of its host time and its kernels'; with a small row that is
the host's. This is the cost the small-batch targets (N = 1 within 2x of amax) meet first.

--stub-triton (CPU): every Triton kernel launch is replaced by a no-op and the Triton backend
timed on CPU tensors: what pg_kernels' own Python costs around its launches (the launches
themselves, Triton's binding and the driver, are the GPU's to measure). The CPU-only label
checks are included there; on CUDA tensors they do not run.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `pg_kernels` importable from the tree
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pg_kernels  # noqa: E402
from pg_kernels import _backend  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def calls(device: torch.device, vocab: int, dtype: torch.dtype) -> dict[str, object]:
    """op -> f(backend) running its forward on one row."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x, r = (torch.randn(1, vocab, generator=gen).to(device, dtype) for _ in range(2))
    labels = torch.randint(0, vocab, (1,), generator=gen).to(device)
    logp = torch.log_softmax(r.float(), -1)
    rollout_lp = logp.gather(-1, labels[:, None])[:, 0]
    ids = torch.topk(logp, min(4, vocab)).indices
    ids_lp = logp.gather(-1, ids)
    return {
        "token_stats": lambda b: pg_kernels.token_stats(x, labels, backend=b),
        "kl_divergence": lambda b: pg_kernels.kl_divergence(x, r, backend=b),
        "mismatch_stats": lambda b: pg_kernels.mismatch_stats(
            x, labels, rollout_lp, rollout_logits=r, backend=b
        ),
        "topk_kl": lambda b: pg_kernels.topk_kl(x, ids, ids_lp, backend=b),
        "pruned_logprob": lambda b: pg_kernels.pruned_logprob(x, labels, alpha=1e-3, backend=b),
        "step_stats": lambda b: pg_kernels.step_stats(
            x, labels, rollout_logprobs=rollout_lp, rollout_logits=r, ref_logits=r, backend=b
        ),
        "amax": lambda b: x.amax(-1),
    }


def time_us(f, device: torch.device, n: int) -> float:
    """Best of three rounds of n calls, microseconds per call."""
    for _ in range(max(10, n // 10)):
        f()
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--dtype", choices=DTYPES, default="fp32")
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--stub-triton", action="store_true", help="CPU: Triton launches as no-ops")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.stub_triton:
        if device.type != "cpu":
            ap.error("--stub-triton times the Triton backend's Python on CPU tensors")
        import triton.runtime.jit

        triton.runtime.jit.JITFunction.__getitem__ = lambda self, grid: lambda *a, **k: None
        _backend.triton_interpreted = lambda: True  # let the Triton backend take CPU tensors
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# forward at N = 1, V = {args.vocab}, {args.dtype}: {name}, torch {torch.__version__}")
    print("| op | backend | us per call | / amax |")
    print("|---|---|---:|---:|")
    fns = calls(device, args.vocab, DTYPES[args.dtype])
    amax = time_us(functools.partial(fns["amax"], None), device, args.calls)
    with torch.no_grad():
        for op, f in fns.items():
            if op == "amax":
                continue
            for backend in _backend.KERNELS[op]:
                if device.type not in _backend.DEVICE_TYPES[backend]:
                    continue
                if _backend.unavailable_reason(backend, device) is not None:
                    continue
                if backend == "triton" and device.type == "cpu" and not args.stub_triton:
                    continue  # the interpreter: nothing a GPU call would cost
                us = time_us(functools.partial(f, backend), device, args.calls)
                print(f"| {op} | {backend} | {us:.1f} | {us / amax:.1f} |")
    print(f"| amax | torch | {amax:.1f} | 1.0 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
