"""Benchmark of pg_kernels.pruned_logprob: shapes, providers, bytes moved. No timing code here.

    python benchmarks/bench_pruned_logprob.py [--device cpu|cuda] [--quick] [--shapes NxV ...]
        [--dtypes fp32 bf16] [--modes fwd bwd fwd+bwd] [--temperature T] [--out benchmarks/out]

alpha = 1e-3 (tokens at least 1/1000 as likely as the top one are safe: ~15% of a 152k
vocabulary at the benchmark's logit spread). The backward modes differentiate
loss = sum(w * logprob) with random per-row weights. Providers: pg_kernels on every backend
with a kernel here (cpu; triton on a GPU), the eager reference
(`reference.pruned_logprob(..., upcast=False)`) and `torch.compile` of it.

Bytes moved (the minimum an ideal kernel moves), s = the logits' itemsize:
  fwd      N V s logits + N * 8 (labels) + N * 9 (logprob, in_safe, tail_mass out)
  bwd      N V s read + N V s grad written + N * 20 (labels, saved lse_safe and threshold, upstream)
  fwd+bwd  the sum of both.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `pg_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pg_kernels
from benchmarks import bench_topk_kl, harness
from benchmarks.harness import Case, Inputs, OpBench, Outputs, Provider, Skip
from pg_kernels import _backend, reference

OP = "pruned_logprob"
DIMS = ("N", "V")
ALPHA = 1e-3
LOGIT_STD = 2.0
CHECK_FIELDS = ("logprob", "tail_mass")


def make_inputs(case: Case, seed: int) -> Inputs:
    """logits [N, V] (dtype of the case), labels [N] int64, loss weights [N] fp32; all random."""
    n, v = case.shape["N"], case.shape["V"]
    gen = torch.Generator(device=case.device).manual_seed(5000 + seed)
    logits = torch.empty(n, v, dtype=case.dtype, device=case.device)
    block = max(1, (1 << 26) // v)
    for r in range(0, n, block):
        rows = min(block, n - r)
        chunk = torch.randn(rows, v, generator=gen, device=case.device) * LOGIT_STD
        logits[r : r + rows] = chunk.to(case.dtype)
    labels = torch.randint(0, v, (n,), generator=gen, device=case.device)
    w = torch.randn(n, generator=gen, device=case.device)
    return {"logits": logits, "labels": labels, "w": w}


def loss(out: Outputs, inputs: Inputs) -> torch.Tensor:
    return (inputs["w"] * out["logprob"]).sum()


def bytes_moved(case: Case) -> int:
    n, v = case.shape["N"], case.shape["V"]
    s = case.dtype.itemsize
    fwd = n * v * s + n * 8 + n * 9
    bwd = 2 * n * v * s + n * 20
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.mode]


def _fields(out) -> Outputs:
    return {f: getattr(out, f) for f in CHECK_FIELDS}


def truth(inputs: Inputs, temperature: float = 1.0) -> Outputs:
    return _fields(
        reference.pruned_logprob(
            inputs["logits"], inputs["labels"], alpha=ALPHA, temperature=temperature, upcast=True
        )
    )


def check_rows(case: Case) -> int:
    return max(1, min(case.shape["N"], (1 << 24) // case.shape["V"]))


def tolerance_floor(case: Case, field: str) -> float:
    """Added to twice the eager reference's own error: fp32 sums (1e-5 relative); gradients
    come back in the logits' dtype (one bf16 rounding, 2^-8)."""
    if field.startswith("grad:") and case.dtype != torch.float32:
        return 2.0**-8
    return 1e-5


def _ref_fn(logits, labels, temperature):
    return reference.pruned_logprob(
        logits, labels, alpha=ALPHA, temperature=temperature, upcast=False
    )


def _pg_provider(backend: str, temperature: float) -> Provider:
    def build(case: Case):
        why = _backend.op_unavailable_reason(OP, backend, case.device)
        if why is not None:
            raise Skip(why)

        def fn(inputs: Inputs) -> Outputs:
            return _fields(
                pg_kernels.pruned_logprob(
                    inputs["logits"], inputs["labels"], alpha=ALPHA, temperature=temperature,
                    backend=backend,
                )
            )  # fmt: skip

        return fn

    return Provider(f"pg_kernels:{backend}", build)


def _eager(case: Case, temperature: float):
    return lambda inputs: _fields(_ref_fn(inputs["logits"], inputs["labels"], temperature))


def _compile(case: Case, temperature: float):
    key = (OP, case.device.type, case.dtype, tuple(case.shape.items()), temperature)
    compiled = harness.compile_once(_ref_fn, key)
    return lambda inputs: _fields(compiled(inputs["logits"], inputs["labels"], temperature))


def make_bench(device: torch.device, temperature: float = 1.0) -> OpBench:
    backends = ("cpu",) if device.type == "cpu" else ("triton", "cuda")
    providers = [_pg_provider(b, temperature) for b in backends]
    providers += [
        Provider("eager", functools.partial(_eager, temperature=temperature)),
        Provider("compile", functools.partial(_compile, temperature=temperature)),
    ]
    # amax / copy rows; on a CPU the floor is one exp per element per pass.
    ceilings, rows = harness.one_read_ceilings(device)
    return OpBench(
        op=OP,
        shape_dims=DIMS,
        make_inputs=make_inputs,
        grad_inputs=("logits",),
        loss=loss,
        bytes_moved=bytes_moved,
        truth=functools.partial(truth, temperature=temperature),
        check_fields=CHECK_FIELDS,
        check_rows=check_rows,
        tolerance_floor=tolerance_floor,
        providers=providers,
        ceilings=ceilings,
        ceiling_rows=rows,
        notes=[f"alpha = {ALPHA:g}"],
        summaries=bench_topk_kl.targets(device, backends),
    )


if __name__ == "__main__":
    sys.exit(harness.main(make_bench, bench_topk_kl.default_shapes, DIMS, OP))
