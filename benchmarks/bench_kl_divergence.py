"""Benchmark of pg_kernels.kl_divergence: shapes, providers, bytes moved. No timing code here.

    python benchmarks/bench_kl_divergence.py [--device cpu|cuda] [--quick] [--shapes NxV ...]
        [--dtypes fp32 bf16] [--modes fwd bwd fwd+bwd] [--temperature T] [--out benchmarks/out]

Direction "reverse" (KL(p || q), on-policy imitation against a frozen teacher): the backward
modes differentiate loss = sum(w * kl) with random per-row weights w.r.t. the logits only.
Providers: pg_kernels on every backend with a kernel here (cpu), the eager reference
(`reference.kl_divergence(..., upcast=False)`, what a plain PyTorch trainer computes) and
`torch.compile` of it.

PGK_BENCH_DOMINANT=f (0 .. 1): the first f of the rows carry a spike of 24 on both sides (a
shared argmax; the logits' rest ~2e-3 at V = 151936), so that the backward's rows with a
dominant weight entry (w_j > 1/2, rest below 2^-7: an RL policy's confident tokens) take
their own path (Triton: a second launch, one program per row; C++: the others' sum).

Bytes moved (the minimum an ideal kernel moves), s = the logits' itemsize:
  fwd      2 N V s (logits, ref_logits) + N * 4 (kl out)
  bwd      2 N V s read + N V s grad written + N * 16 (saved L, L_ref, KL; upstream)
  fwd+bwd  the sum of both.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `pg_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pg_kernels
from benchmarks import harness
from benchmarks.harness import (
    Case,
    CeilingRow,
    Inputs,
    OpBench,
    Outputs,
    Provider,
    Skip,
    Target,
)
from pg_kernels import _backend, reference

OP = "kl_divergence"
DIMS = ("N", "V")
DIRECTION = "reverse"
LOGIT_STD = 2.0
TEACHER_NOISE = 0.5  # the reference is a perturbation of the logits: KL ~ 0.1 nats, realistic
DOMINANT_SPIKE = 24.0  # PGK_BENCH_DOMINANT's spike


def default_shapes(device: torch.device, quick: bool) -> list[dict[str, int]]:
    if device.type == "cuda":
        return [{"N": 4096, "V": 32000}, {"N": 4096, "V": 151936}]
    if quick:
        return [{"N": 256, "V": 32000}]
    return [{"N": 1024, "V": 32000}, {"N": 512, "V": 151936}]


def make_inputs(case: Case, seed: int) -> Inputs:
    """logits, ref_logits [N, V] (dtype of the case), loss weights [N] fp32; all random."""
    n, v = case.shape["N"], case.shape["V"]
    gen = torch.Generator(device=case.device).manual_seed(2000 + seed)
    logits = torch.empty(n, v, dtype=case.dtype, device=case.device)
    ref = torch.empty_like(logits)
    block = max(1, (1 << 26) // v)
    for r in range(0, n, block):
        rows = min(block, n - r)
        chunk = torch.randn(rows, v, generator=gen, device=case.device) * LOGIT_STD
        noise = torch.randn(rows, v, generator=gen, device=case.device) * TEACHER_NOISE
        logits[r : r + rows] = chunk.to(case.dtype)
        ref[r : r + rows] = (chunk + noise).to(case.dtype)
    dominant = round(float(os.environ.get("PGK_BENCH_DOMINANT", "0")) * n)
    logits[:dominant, v // 3] += DOMINANT_SPIKE
    ref[:dominant, v // 3] += DOMINANT_SPIKE
    w = torch.randn(n, generator=gen, device=case.device)
    return {"logits": logits, "ref_logits": ref, "w": w}


def loss(out: Outputs, inputs: Inputs) -> torch.Tensor:
    return (inputs["w"] * out["kl"]).sum()


def bytes_moved(case: Case) -> int:
    n, v = case.shape["N"], case.shape["V"]
    s = case.dtype.itemsize
    fwd = 2 * n * v * s + n * 4
    bwd = 3 * n * v * s + n * 16
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.mode]


def truth(inputs: Inputs, temperature: float = 1.0) -> Outputs:
    kl = reference.kl_divergence(
        inputs["logits"], inputs["ref_logits"], direction=DIRECTION, temperature=temperature,
        upcast=True,
    )  # fmt: skip
    return {"kl": kl}


def check_rows(case: Case) -> int:
    return max(1, min(case.shape["N"], (1 << 24) // case.shape["V"]))


def tolerance_floor(case: Case, field: str) -> float:
    """Added to twice the eager reference's own error. KL is an fp32 sum (1e-5 relative);
    gradients come back in the logits' dtype (one bf16 rounding, 2^-8)."""
    if field.startswith("grad:") and case.dtype != torch.float32:
        return 2.0**-8
    return 1e-5


def _ref_fn(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return reference.kl_divergence(
        logits, ref_logits, direction=DIRECTION, temperature=temperature, upcast=False
    )


def _pg_provider(backend: str, temperature: float, excess16: bool = False) -> Provider:
    """pg_kernels on `backend`; `excess16`: Triton with the 16-bit pair lanes' excess k
    (`_pair.EXCESS_16BIT`, README, Testing, open class (1)), its forward timed beside the
    default (opt-in, the GPU check's step `excess`)."""

    def build(case: Case):
        why = _backend.op_unavailable_reason(OP, backend, case.device)
        if why is not None:
            raise Skip(why)
        variant = contextlib.nullcontext
        if excess16:
            from pg_kernels.triton import _pair

            variant = _pair.excess_16bit

        def fn(inputs: Inputs) -> Outputs:
            with variant():
                kl = pg_kernels.kl_divergence(
                    inputs["logits"], inputs["ref_logits"], direction=DIRECTION,
                    temperature=temperature, backend=backend,
                )  # fmt: skip
            return {"kl": kl}

        return fn

    if excess16:
        return Provider(f"excess16:{backend}", build, opt_in=True)
    return Provider(f"pg_kernels:{backend}", build)


def _eager(case: Case, temperature: float):
    return lambda inputs: {"kl": _ref_fn(inputs["logits"], inputs["ref_logits"], temperature)}


def _compile(case: Case, temperature: float):
    key = (OP, case.device.type, case.dtype, tuple(case.shape.items()), temperature)
    compiled = harness.compile_once(_ref_fn, key)
    return lambda inputs: {"kl": compiled(inputs["logits"], inputs["ref_logits"], temperature)}


def targets(
    device: torch.device, backends: tuple[str, ...], other: str = "ref_logits", note: str = ""
) -> list:
    """The targets, for kl_divergence and (other="rollout_logits") mismatch_stats: CPU
    forward at [1024, 32000] >= 8x eager and >= 1.3x compile; GPU forward <= 1.1 x two pure
    reads (amax over logits and over `other`), fwd+bwd <= 1.15 x (those reads + one copy)."""
    reads = f"ceiling:amax:logits+amax:{other}"
    if device.type == "cpu":
        return [
            harness.targets_summary(
                f"Targets: CPU forward at 1024×32000{note}",
                "pg_kernels:cpu",
                {"N": 1024, "V": 32000},
                [
                    Target("×eager ≥ 8", "fwd", "eager", at_least=8),
                    Target("×compile ≥ 1.3", "fwd", "compile", at_least=1.3),
                    Target(
                        "ms / ms(2 exp passes)",
                        "fwd",
                        f"ceiling:exp:logits+exp:{other}",
                        time_ratio=True,
                    ),
                ],
            )
        ]
    return [
        harness.targets_summary(
            f"Targets: {backend} at 16384×151936{note}",
            f"pg_kernels:{backend}",
            {"N": 16384, "V": 151936},
            [
                Target("fwd / 2 reads ≤ 1.1", "fwd", reads, at_most=1.1),
                Target(
                    "fwd+bwd / (2 reads + copy) ≤ 1.15", "fwd+bwd", f"{reads}+copy", at_most=1.15
                ),
                Target("fwd ×eager", "fwd", "eager"),
                Target("fwd ×compile", "fwd", "compile"),
            ],
        )
        for backend in backends
    ] + [
        harness.targets_summary(
            f"The 16-bit excess k (`_pair.EXCESS_16BIT`) at 16384×151936{note}",
            "excess16:triton",
            {"N": 16384, "V": 151936},
            [
                Target("fwd / 2 reads ≤ 1.1", "fwd", reads, at_most=1.1),
                Target("fwd / default", "fwd", "pg_kernels:triton", time_ratio=True),
            ],
        )
    ]


def make_bench(device: torch.device, temperature: float = 1.0) -> OpBench:
    backends = ("cpu",) if device.type == "cpu" else ("triton", "cuda")
    providers = [_pg_provider(b, temperature) for b in backends]
    providers += [
        Provider("eager", functools.partial(_eager, temperature=temperature)),
        Provider("compile", functools.partial(_compile, temperature=temperature)),
        _pg_provider("triton", temperature, excess16=True),
    ]
    ceilings = {
        "amax:logits": harness.amax_ceiling("logits"),
        "amax:ref_logits": harness.amax_ceiling("ref_logits"),
        "copy": harness.copy_ceiling(),
    }
    both = ("amax:logits", "amax:ref_logits")
    rows: dict[str, list[CeilingRow]] = {
        "fwd": [CeilingRow(both)],
        "bwd": [CeilingRow((*both, "copy"))],
        # The minimum of a forward and a backward (both tensors read twice, the gradient written
        # once: 4 reads + 1 write), then the target's denominator, two reads + one copy.
        "fwd+bwd": [
            CeilingRow((*both, "amax:ref_logits", "copy")),
            CeilingRow((*both, "copy")),
        ],
    }
    if device.type == "cpu":
        # The CPU floor: the forward needs one exp per element of each tensor (both
        # normalizers); the reverse-KL backward w.r.t. the logits one exp per logit (p_j).
        ceilings["exp:logits"] = harness.exp_ceiling("logits")
        ceilings["exp:ref_logits"] = harness.exp_ceiling("ref_logits")
        exps = ("exp:logits", "exp:ref_logits")
        rows["fwd"].append(CeilingRow(exps, "floor"))
        rows["bwd"].append(CeilingRow(("exp:logits",), "floor"))
        rows["fwd+bwd"].append(CeilingRow((*exps, "exp:logits"), "floor"))
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
        notes=[f"direction={DIRECTION}; backward w.r.t. logits only (frozen reference)"],
        summaries=targets(device, backends),
        paired=(("pg_kernels:cpu", "ceiling:exp:logits+exp:ref_logits"),),
    )


if __name__ == "__main__":
    sys.exit(harness.main(make_bench, default_shapes, DIMS, OP))
