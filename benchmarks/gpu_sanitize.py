"""Every kernel, forward and backward, on small awkward inputs: the program compute-sanitizer runs.

    compute-sanitizer --tool memcheck python benchmarks/gpu_sanitize.py [--device cuda]
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 is set by benchmarks/gpu_check.sh for that run: with torch's
    caching allocator, a read past a tensor lands in the same cached block and memcheck sees
    nothing; without it each tensor is its own cudaMalloc.

For each op, each kernel backend that exists for it and can run on the device (the GPU ones:
"triton", and "cuda" where the op has a CUDA kernel; on CPU, for a dry run, "cpu"), each dtype
(bf16, fp16, fp32, fp64) and a ragged vocabulary (V = 1000 at temperature 1, V = 32003 at 0.7):
  1. logits[:, :-1] of a [2, 3, V] tensor (strided rows), labels with an ignored row: checked
     against the float64 reference with the test suite's tolerances (`check_against_reference`),
     forward and the gradients of every differentiable output and argument;
  2. the same with one NaN logit in the first row: forward and backward run, and every other
     row stays finite (the NaN does not leak across rows).
Small shapes on purpose: under the sanitizer every launch and every Triton compile is slower.
Prints one line per case and a summary; exits 1 when any case failed.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `pg_kernels` importable from the tree
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pg_kernels  # noqa: E402
from pg_kernels import _backend, reference  # noqa: E402
from pg_kernels.testing import check_against_reference, make_logits  # noqa: E402

OPS = ("token_stats", "kl_divergence", "mismatch_stats", "pruned_logprob", "topk_kl")
DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp64": torch.float64,
}
VOCABS = ((1000, 1.0), (32003, 0.7))  # (V, temperature): both temperature paths
IGNORE = -100
K = 5  # topk_kl ids per row


def kernel_backends(op: str, device: torch.device, wanted=None) -> list[str]:
    """The kernel backends of `op` (of `wanted`, default: the GPU ones on CUDA, "cpu" on CPU)
    that can take tensors of `device` here."""
    if wanted is None:
        wanted = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    return [b for b in wanted if _backend.op_unavailable_reason(op, b, device) is None]


def missing_backends(device: torch.device) -> list[str]:
    """GPU backends that should run here but cannot (e.g. the CUDA extension did not import)."""
    if device.type != "cuda":
        return []
    return [
        f"{b}: {why}"
        for b in ("triton", "cuda")
        if (why := _backend.unavailable_reason(b, device)) is not None
    ]


def strided_logits(v: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """logits[:, :-1] of a [2, 3, V] tensor: [2, 2, V], rows 3 V apart in the first dim."""
    return make_logits((2, 3), v, dtype, device=device, seed=seed)[:, :-1]


def labels_for(v: int, device: torch.device) -> torch.Tensor:
    """[2, 2] labels: the first and the last token, one ignored row, one in the middle."""
    return torch.tensor([[0, IGNORE], [v // 2 + 1, v - 1]], device=device)


def case_args(op: str, backend: str, x: torch.Tensor, y: torch.Tensor, temperature: float, seed):
    """(op_fn, ref_fn, args, kwargs, diff_fields, grad_args) for check_against_reference."""
    v = x.shape[-1]
    g = torch.Generator().manual_seed(seed)
    if op == "token_stats":
        fn = lambda *a, **k: pg_kernels.token_stats(*a, backend=backend, **k)  # noqa: E731
        kw = {"temperature": temperature, "ignore_index": IGNORE}
        return (
            fn,
            reference.token_stats,
            (x, y),
            kw,
            ("logprob", "entropy", "collision", "lse"),
            (0,),
        )
    if op == "kl_divergence":
        xr = x.detach().double() + torch.randn(x.shape, generator=g, dtype=torch.float64).to(
            x.device
        )
        xr = xr.to(x.dtype).contiguous()  # strided differently from the logits
        direction = "reverse" if v < 10000 else "forward"
        fn = lambda *a, **k: pg_kernels.kl_divergence(*a, backend=backend, **k)  # noqa: E731
        kw = {
            "direction": direction,
            "temperature": temperature,
            "labels": y,
            "ignore_index": IGNORE,
        }
        return fn, reference.kl_divergence, (x, xr), kw, ("out",), (0, 1)
    if op == "mismatch_stats":
        noise = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.device) * 0.1
        xr = (x.detach().double() + noise).to(x.dtype).contiguous()
        lp = xr.double().log_softmax(-1).gather(-1, y.clamp_min(0)[..., None])[..., 0].float()
        fn = lambda *a, **k: pg_kernels.mismatch_stats(*a, backend=backend, **k)  # noqa: E731
        kw = {"rollout_logits": xr, "temperature": temperature, "ignore_index": IGNORE}
        return fn, reference.mismatch_stats, (x, y, lp), kw, ("logprob",), (0,)
    if op == "pruned_logprob":
        fn = lambda *a, **k: pg_kernels.pruned_logprob(*a, backend=backend, **k)  # noqa: E731
        kw = {"alpha": 0.05, "temperature": temperature, "ignore_index": IGNORE}
        return fn, reference.pruned_logprob, (x, y), kw, ("logprob",), (0,)
    if op == "topk_kl":
        base = x.detach().double().cpu()
        logq = (base + torch.randn(base.shape, generator=g, dtype=torch.float64)).log_softmax(-1)
        lp, ids = logq.topk(K, dim=-1)
        perm = torch.rand(ids.shape, generator=g).argsort(-1)  # ids in random order
        lp_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        ids, lp = ids.gather(-1, perm).to(x.device), lp.gather(-1, perm).to(lp_dtype).to(x.device)
        fn = lambda *a, **k: pg_kernels.topk_kl(*a, backend=backend, **k)  # noqa: E731
        kw = {"temperature": temperature, "labels": y, "ignore_index": IGNORE}
        return fn, reference.topk_kl, (x, ids, lp), kw, ("out",), (0,)
    raise ValueError(op)


def nan_row_check(fn, args, kwargs, diff_fields, grad_args) -> None:
    """One NaN logit in row 0: forward and backward run; rows 1.. stay finite."""
    args = list(args)
    x = args[0].detach()
    full = torch.empty((x.shape[0], x.shape[1] + 1, x.shape[2]), dtype=x.dtype, device=x.device)
    full[:, :-1] = x
    full[0, 0, 7] = float("nan")
    args[0] = full[:, :-1]  # strided like the first run's logits
    leaves = [a.detach().clone().requires_grad_(True) if i in grad_args else a
              for i, a in enumerate(args)]  # fmt: skip
    out = fn(*leaves, **kwargs)
    fields = out._asdict() if hasattr(out, "_asdict") else {"out": out}
    loss = 0
    for name, t in fields.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        rest = t.reshape(-1)[1:]
        if not bool(torch.isfinite(rest).all()):
            raise AssertionError(f"NaN row: {name} not finite outside row 0: {rest.tolist()}")
        if name in diff_fields:
            loss = loss + (t.double().nan_to_num() * 0.5).sum()
    grads = torch.autograd.grad(loss, [leaves[i] for i in grad_args])
    for i, gr in zip(grad_args, grads):
        rest = gr.reshape(-1, gr.shape[-1])[1:]
        if not bool(torch.isfinite(rest).all()):
            raise AssertionError(f"NaN row: gradient of argument {i} not finite outside row 0")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument(
        "--vocabs",
        nargs="+",
        type=int,
        default=[v for v, _ in VOCABS],
        help="each V > 10000 runs at temperature 0.7, the others at 1",
    )
    parser.add_argument("--backends", nargs="+", default=None,
                        help="default: triton and cuda on a GPU, cpu on CPU (triton on CPU "
                        "needs TRITON_INTERPRET=1)")  # fmt: skip
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(pg_kernels.env_report(), flush=True)
    failures, ran = [], 0
    for why in missing_backends(device):
        failures.append(f"backend unavailable on {device}: {why}")
        print(f"FAIL backend unavailable on {device}: {why}", flush=True)
    for op in args.ops:
        backends = kernel_backends(op, device, args.backends)
        if not backends:
            failures.append(f"{op}: no kernel backend runs on {device}")
            print(f"FAIL {op}: no kernel backend runs on {device}", flush=True)
        for backend in backends:
            for dname in args.dtypes:
                for seed, v in enumerate(args.vocabs):
                    temperature = 0.7 if v > 10000 else 1.0
                    label = f"{op:15s} {backend:6s} {dname} V={v} T={temperature:g}"
                    t0 = time.perf_counter()
                    try:
                        x = strided_logits(v, DTYPES[dname], device, seed)
                        y = labels_for(v, device)
                        fn, ref, a, kw, diff, grad_args = case_args(
                            op, backend, x, y, temperature, seed
                        )
                        check_against_reference(
                            fn, ref, a, kw, diff_fields=diff, grad_args=grad_args, seed=seed
                        )
                        nan_row_check(fn, a, kw, diff, grad_args)
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        status = "ok"
                    except Exception as e:  # noqa: BLE001 (report every case, then fail)
                        status = f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:300]}"
                        failures.append(f"{label}: {status}")
                        traceback.print_exc()
                    ran += 1
                    print(f"{label}  {time.perf_counter() - t0:6.2f} s  {status}", flush=True)
    print(f"gpu_sanitize: {ran} cases on {device}, {len(failures)} failed", flush=True)
    for f in failures:
        print(f"  {f}")
    return 1 if failures or ran == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
