"""Benchmark of pg_kernels.topk_kl: shapes, providers, bytes moved. No timing code here.

    python benchmarks/bench_topk_kl.py [--device cpu|cuda] [--quick] [--shapes NxV ...]
        [--dtypes fp32 bf16] [--modes fwd bwd fwd+bwd] [--temperature T] [--out benchmarks/out]

Distillation from an engine's top-K log-probs (K = 20, what inference engines return): the
teacher q is the top 20 of softmax(noisy copy of the logits), given as ids and log-probs; the
backward modes differentiate loss = sum(w * kl) with random per-row weights. Providers:
pg_kernels on every backend with a kernel here (cpu; triton on a GPU), the eager reference
(`reference.topk_kl(..., upcast=False)`) and `torch.compile` of it.

Bytes moved (the minimum an ideal kernel moves), s = the logits' itemsize:
  fwd      N V s logits + N K 12 (int64 ids, fp32 log-probs, read) + N * 4 (kl out)
  bwd      N V s read + N V s grad written + N K 12 + N * 12 (saved lse, log p_tail; upstream)
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
from benchmarks import harness
from benchmarks.harness import Case, Inputs, OpBench, Outputs, Provider, Skip, Target
from pg_kernels import _backend, reference

OP = "topk_kl"
DIMS = ("N", "V")
K = 20
LOGIT_STD = 2.0
TEACHER_NOISE = 0.5  # the teacher is a perturbation of the logits: KL ~ 0.1 nats, realistic


def default_shapes(device: torch.device, quick: bool) -> list[dict[str, int]]:
    if device.type == "cuda":
        if quick:
            return [{"N": 4096, "V": 151936}]
        return [{"N": n, "V": 151936} for n in (1, 512, 4096, 16384)]
    if quick:
        return [{"N": 256, "V": 32000}]
    return [{"N": 1024, "V": 32000}, {"N": 512, "V": 151936}]


def make_inputs(case: Case, seed: int) -> Inputs:
    """logits [N, V] (dtype of the case), topk_ids [N, K] int64 (distinct per row),
    topk_logprobs [N, K] fp32 (the teacher's top-K log-probs), loss weights [N]; all random."""
    n, v = case.shape["N"], case.shape["V"]
    k = min(K, v)
    gen = torch.Generator(device=case.device).manual_seed(4000 + seed)
    logits = torch.empty(n, v, dtype=case.dtype, device=case.device)
    ids = torch.empty(n, k, dtype=torch.int64, device=case.device)
    logprobs = torch.empty(n, k, device=case.device)
    block = max(1, (1 << 26) // v)
    for r in range(0, n, block):
        rows = min(block, n - r)
        chunk = torch.randn(rows, v, generator=gen, device=case.device) * LOGIT_STD
        teacher = chunk + torch.randn(rows, v, generator=gen, device=case.device) * TEACHER_NOISE
        top = teacher.log_softmax(-1).topk(k, dim=-1)
        logits[r : r + rows] = chunk.to(case.dtype)
        ids[r : r + rows] = top.indices
        logprobs[r : r + rows] = top.values
    w = torch.randn(n, generator=gen, device=case.device)
    return {"logits": logits, "topk_ids": ids, "topk_logprobs": logprobs, "w": w}


def loss(out: Outputs, inputs: Inputs) -> torch.Tensor:
    return (inputs["w"] * out["kl"]).sum()


def bytes_moved(case: Case) -> int:
    n, v = case.shape["N"], case.shape["V"]
    s = case.dtype.itemsize
    ids = n * min(K, v) * (8 + 4)
    fwd = n * v * s + ids + n * 4
    bwd = 2 * n * v * s + ids + n * 12
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.mode]


def _args(inputs: Inputs):
    return inputs["logits"], inputs["topk_ids"], inputs["topk_logprobs"]


def truth(inputs: Inputs, temperature: float = 1.0) -> Outputs:
    return {"kl": reference.topk_kl(*_args(inputs), temperature=temperature, upcast=True)}


def check_rows(case: Case) -> int:
    return max(1, min(case.shape["N"], (1 << 24) // case.shape["V"]))


def tolerance_floor(case: Case, field: str) -> float:
    """Added to twice the eager reference's own error. KL is an fp32 sum (1e-5 relative);
    gradients come back in the logits' dtype (one bf16 rounding, 2^-8)."""
    if field.startswith("grad:") and case.dtype != torch.float32:
        return 2.0**-8
    return 1e-5


def _ref_fn(logits, topk_ids, topk_logprobs, temperature):
    return reference.topk_kl(logits, topk_ids, topk_logprobs, temperature=temperature, upcast=False)


def _pg_provider(backend: str, temperature: float) -> Provider:
    def build(case: Case):
        why = _backend.op_unavailable_reason(OP, backend, case.device)
        if why is not None:
            raise Skip(why)

        def fn(inputs: Inputs) -> Outputs:
            kl = pg_kernels.topk_kl(*_args(inputs), temperature=temperature, backend=backend)
            return {"kl": kl}

        return fn

    return Provider(f"pg_kernels:{backend}", build)


def _eager(case: Case, temperature: float):
    return lambda inputs: {"kl": _ref_fn(*_args(inputs), temperature)}


def _compile(case: Case, temperature: float):
    key = (OP, case.device.type, case.dtype, tuple(case.shape.items()), temperature)
    compiled = harness.compile_once(_ref_fn, key)
    return lambda inputs: {"kl": compiled(*_args(inputs), temperature)}


def targets(device: torch.device, backends: tuple[str, ...]) -> list:
    """CPU forward at [1024, 32000] against eager, compile and one exp pass; GPU forward
    <= 1.1 x one read of the logits, fwd+bwd against one read + one copy."""
    if device.type == "cpu":
        return [
            harness.targets_summary(
                "Targets: CPU forward at 1024×32000",
                "pg_kernels:cpu",
                {"N": 1024, "V": 32000},
                [
                    Target("×eager", "fwd", "eager"),
                    Target("×compile", "fwd", "compile"),
                    Target("ms / ms(exp)", "fwd", "ceiling:exp", time_ratio=True),
                ],
            )
        ]
    return [
        harness.targets_summary(
            f"Targets: {backend} at 16384×151936",
            f"pg_kernels:{backend}",
            {"N": 16384, "V": 151936},
            [
                Target("fwd / amax ≤ 1.1", "fwd", "ceiling:amax", at_most=1.1),
                Target("fwd+bwd / (amax+copy)", "fwd+bwd", "ceiling:amax+copy", time_ratio=True),
                Target("fwd ×eager", "fwd", "eager"),
                Target("fwd ×compile", "fwd", "compile"),
            ],
        )
        for backend in backends
    ]


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
        check_fields=("kl",),
        check_rows=check_rows,
        tolerance_floor=tolerance_floor,
        providers=providers,
        ceilings=ceilings,
        ceiling_rows=rows,
        notes=[f"K = {K} teacher ids per row (distinct, the top-K of a noisy copy)"],
        summaries=targets(device, backends),
    )


if __name__ == "__main__":
    sys.exit(harness.main(make_bench, default_shapes, DIMS, OP))
