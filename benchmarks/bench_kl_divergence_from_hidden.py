"""Benchmark of pg_kernels.kl_divergence_from_hidden: dense KL to a teacher from both lm_heads.

    python benchmarks/bench_kl_divergence_from_hidden.py [--device cpu|cuda] [--quick]
        [--shapes NxVxD ...] [--dtypes fp32 bf16] [--modes fwd bwd fwd+bwd] [--out ...]

A student (hidden [N, D], weight [V, D], both differentiated) against a frozen teacher of the
same shape (its hidden and weight not differentiated), reverse KL at temperature 1, a loss of
sum(w * kl). Providers: pg_kernels on every backend this device can run, in its default order
(vocabulary blocks run as vocab-parallel shards) and in row chunks (`rows:<backend>`,
`backward_order="rows"`: a [V, D] accumulator for the weight's gradient, fp32 for 16-bit
weights); `unfused`, both logits materialized (`hidden @ weight.T`), then
pg_kernels.kl_divergence on the same backend; `eager`, the same in plain PyTorch at the input
precision (the trainer path); `kl_loss:<backend>`, kl_loss_from_hidden with the same loss
(gradients formed in the forward: four matmuls in row chunks, a CPU's default order; six in
vocabulary blocks, CUDA's) and opt-in `kl_loss_rows:<backend>` / `kl_loss_vocab:<backend>`.
Six N·V·D matmuls fused (the backward recomputes both sides' logits), four unfused: the op is
matmul-bound, and its point is the memory (`peak MB`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `pg_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pg_kernels
from benchmarks import harness
from benchmarks.bench_token_stats_from_hidden import check_rows, tolerance_floor
from benchmarks.harness import Case, Inputs, OpBench, Outputs, Provider, Skip, Target
from pg_kernels import _backend, reference

OP = "kl_divergence_from_hidden"
DIMS = ("N", "V", "D")
CPU_SHAPE = {"N": 4096, "V": 32000, "D": 1024}
GPU_SHAPE = {"N": 16384, "V": 151936, "D": 4096}


def default_shapes(device: torch.device, quick: bool) -> list[dict[str, int]]:
    if device.type == "cuda":
        return [GPU_SHAPE]
    return [{"N": 512, "V": 32000, "D": 1024}] if quick else [CPU_SHAPE]


def make_inputs(case: Case, seed: int) -> Inputs:
    """Both sides' hidden ~ N(0, 1) and weights scaled so logits have std ~2, the teacher's
    weight the student's plus noise of half its size (KLs of ~0.5: a nearer pair's bf16
    gradients are mostly the logits' own rounding, 3.8e-2 off in plain PyTorch at noise 0.25,
    beyond the harness's baseline ceiling); per-row loss weights."""
    n, v, d = case.shape["N"], case.shape["V"], case.shape["D"]
    gen = torch.Generator(device=case.device).manual_seed(3000 + seed)
    dev = case.device
    weight = torch.randn(v, d, generator=gen, device=dev) * (2.0 / d**0.5)
    ref_weight = weight + torch.randn(v, d, generator=gen, device=dev) * (1.0 / d**0.5)
    hidden = torch.randn(n, d, generator=gen, device=dev)
    ref_hidden = hidden + 0.1 * torch.randn(n, d, generator=gen, device=dev)
    return {
        "hidden": hidden.to(case.dtype), "weight": weight.to(case.dtype),
        "ref_hidden": ref_hidden.to(case.dtype), "ref_weight": ref_weight.to(case.dtype),
        "w": torch.rand(n, generator=gen, device=dev) + 0.5,
    }  # fmt: skip


def bytes_moved(case: Case) -> int:
    """Both sides' hidden and weight read once (the student's twice and its gradients written
    in the backward), and the per-row KL: matmul-bound, this is only the floor."""
    n, v, d = case.shape["N"], case.shape["V"], case.shape["D"]
    s = case.dtype.itemsize
    fwd = 2 * (n * d + v * d) * s + 4 * n
    bwd = 2 * (n * d + v * d) * s + 2 * (n * d + v * d) * s + 4 * n
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.mode]


def truth(inputs: Inputs) -> Outputs:
    logits = torch.nn.functional.linear(inputs["hidden"], inputs["weight"])
    ref_logits = torch.nn.functional.linear(inputs["ref_hidden"], inputs["ref_weight"])
    return {"kl": reference.kl_divergence(logits, ref_logits)}


def loss(out: Outputs, inputs: Inputs) -> torch.Tensor:
    """sum(w * kl), or the loss a provider fused (out["loss"])."""
    return out["loss"] if "loss" in out else (inputs["w"] * out["kl"]).sum()


def _fused(backend: str, order: str = "auto") -> Provider:
    def build(case: Case) -> Callable[[Inputs], Outputs]:
        why = _backend.op_unavailable_reason("kl_divergence", backend, case.device)
        if why is not None:
            raise Skip(why)
        return lambda x: {
            "kl": pg_kernels.kl_divergence_from_hidden(
                x["hidden"],
                x["weight"],
                x["ref_hidden"],
                x["ref_weight"],
                backward_order=order,
                backend=backend,
            )
        }

    return Provider(f"pg_kernels:{backend}" if order == "auto" else f"{order}:{backend}", build)


def _kl_loss(backend: str, order: str = "auto") -> Provider:
    """kl_loss_from_hidden with this benchmark's loss. Its backward alone only scales the
    gradients the forward formed, so it has no "bwd" row."""

    def build(case: Case) -> Callable[[Inputs], Outputs]:
        why = _backend.op_unavailable_reason("kl_divergence", backend, case.device)
        if why is not None or case.mode == "bwd":
            raise Skip(why or "its gradients are formed in the forward: see fwd+bwd")

        def fn(x: Inputs) -> Outputs:
            out = pg_kernels.kl_loss_from_hidden(
                x["hidden"], x["weight"], x["ref_hidden"], x["ref_weight"],
                lambda kl, rows: (x["w"][rows] * kl).sum(), backward_order=order,
                backend=backend,
            )  # fmt: skip
            return {"kl": out.kl, "loss": out.loss}

        return fn

    if order == "auto":
        return Provider(f"kl_loss:{backend}", build)
    return Provider(f"kl_loss_{order}:{backend}", build, opt_in=True)


def _unfused(backend: str) -> Provider:
    def build(case: Case) -> Callable[[Inputs], Outputs]:
        why = _backend.op_unavailable_reason("kl_divergence", backend, case.device)
        if why is not None:
            raise Skip(why)
        return lambda x: {
            "kl": pg_kernels.kl_divergence(
                x["hidden"] @ x["weight"].t(),
                x["ref_hidden"] @ x["ref_weight"].t(),
                backend=backend,
            )
        }

    return Provider(f"unfused:{backend}", build)


def _eager(case: Case) -> Callable[[Inputs], Outputs]:
    return lambda x: {
        "kl": reference.kl_divergence(
            x["hidden"] @ x["weight"].t(), x["ref_hidden"] @ x["ref_weight"].t(), upcast=False
        )
    }


def make_bench(device: torch.device, temperature: float = 1.0) -> OpBench:
    if temperature != 1.0:
        raise SystemExit(f"{OP}: --temperature is not supported by this benchmark")
    backends = ("cpu",) if device.type == "cpu" else ("triton",)
    providers = [_fused(b) for b in backends] + [_fused(b, "rows") for b in backends]
    providers += [_kl_loss(b) for b in backends]
    providers += [_kl_loss(b, order) for b in backends for order in ("rows", "vocab")]
    providers += [_unfused(b) for b in backends] + [Provider("eager", _eager)]
    main, rows = f"pg_kernels:{backends[0]}", f"rows:{backends[0]}"
    unfused = f"unfused:{backends[0]}"
    shape = GPU_SHAPE if device.type == "cuda" else CPU_SHAPE
    at = "x".join(map(str, shape.values()))
    summary = harness.targets_summary(
        f"Vocabulary blocks against row chunks and the unfused path at {at}", main, shape,
        [Target(f"fwd+bwd / {rows}", "fwd+bwd", rows, time_ratio=True),
         Target(f"fwd+bwd / {unfused}", "fwd+bwd", unfused, time_ratio=True)],
    )  # fmt: skip
    fused_loss = f"kl_loss:{backends[0]}"
    loss_summary = harness.targets_summary(
        f"{fused_loss} (the loss fused: gradients formed in the forward) at {at}", fused_loss,
        shape, [Target(f"fwd+bwd / {main}", "fwd+bwd", main, time_ratio=True),
                Target(f"fwd+bwd / {unfused}", "fwd+bwd", unfused, time_ratio=True)],
    )  # fmt: skip
    return OpBench(
        op=OP,
        shape_dims=DIMS,
        make_inputs=make_inputs,
        grad_inputs=("hidden", "weight"),
        shared_inputs=("weight", "ref_weight"),
        loss=loss,
        bytes_moved=bytes_moved,
        truth=truth,
        check_fields=("kl",),
        check_rows=check_rows,
        tolerance_floor=tolerance_floor,
        providers=providers,
        ceilings={},
        ceiling_rows={},
        baselines=(rows, unfused, "eager"),
        notes=[
            "matmul-bound: GB/s counts only hidden, weight and per-row tensors; compare times "
            "and peak memory",
        ],
        summaries=[summary, loss_summary],
    )


if __name__ == "__main__":
    sys.exit(harness.main(make_bench, default_shapes, DIMS, OP))
