"""Benchmark of pg_kernels.token_stats_from_hidden: the fused lm_head + token_stats path.

    python benchmarks/bench_token_stats_from_hidden.py [--device cpu|cuda] [--quick]
        [--shapes NxVxD ...] [--dtypes fp32 bf16] [--modes fwd bwd fwd+bwd] [--out ...]

Providers: pg_kernels on every backend this device can run (chunked: [N, V] never exists),
and opt-in `rows:<backend>`, the same with its backward in row chunks (`backward_order`);
`token_loss:<backend>`, token_loss_from_hidden (the loss fused, gradients formed in the
forward), and opt-in `token_loss_rows:<backend>` / `token_loss_vocab:<backend>`, its two orders;
on GPU, Liger-Kernel's fused linear cross entropy (`liger_flce`) and Cut-Cross-Entropy (`cce`),
which give the log-prob only (their wheels: benchmarks/fetch_peers.sh);
`unfused`, the same statistics from materialized logits (`hidden @ weight.T`, then
pg_kernels.token_stats on the same backend), the time baseline of the fused path; `eager`,
the plain PyTorch trainer path (the matmul, then reference.token_stats in the input precision).
The backward modes differentiate sum(w_lp * logprob + w_H * entropy + w_C * collision) with
respect to hidden and weight.

The op is matmul-bound (4 matmuls of 2·N·V·D flops fused, 3 unfused: the fused backward
recomputes each chunk's logits), so "bytes" here are only what must cross memory at least:
hidden, weight, labels and the per-row outputs (and their gradients in the backward).
Peak memory (the `peak MB` column) is the point of the fused path: the target is fused
fwd+bwd <= 20 % of N·V·4 bytes, what the fp32 logits alone would take.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `pg_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pg_kernels
from benchmarks import harness
from benchmarks.bench_token_stats import CHECK_FIELDS, IGNORE_INDEX, LOSS_FIELDS
from benchmarks.bench_token_stats import loss as stats_loss
from benchmarks.harness import Case, Inputs, OpBench, Outputs, Provider, Skip, Target
from pg_kernels import _backend, reference

OP = "token_stats_from_hidden"
DIMS = ("N", "V", "D")
TARGET_SHAPE = {"N": 16384, "V": 32000, "D": 1024}  # CPU
GPU_SHAPE = {"N": 16384, "V": 151936, "D": 4096}


def default_shapes(device: torch.device, quick: bool) -> list[dict[str, int]]:
    if device.type == "cuda":
        return [GPU_SHAPE] + ([] if quick else [TARGET_SHAPE])
    return [{"N": 1024, "V": 32000, "D": 1024}] if quick else [TARGET_SHAPE]


def make_inputs(case: Case, seed: int) -> Inputs:
    """hidden [N, D] ~ N(0, 1), weight [V, D] scaled so logits have std ~2; labels; weights."""
    n, v, d = case.shape["N"], case.shape["V"], case.shape["D"]
    gen = torch.Generator(device=case.device).manual_seed(2000 + seed)
    dev = case.device
    hidden = torch.randn(n, d, generator=gen, device=dev).to(case.dtype)
    weight = (torch.randn(v, d, generator=gen, device=dev) * (2.0 / d**0.5)).to(case.dtype)
    labels = torch.randint(0, v, (n,), generator=gen, device=dev)
    weights = {f"w_{f}": torch.randn(n, generator=gen, device=dev) for f in LOSS_FIELDS}
    return {"hidden": hidden, "weight": weight, "labels": labels, **weights}


def bytes_moved(case: Case) -> int:
    n, v, d = case.shape["N"], case.shape["V"], case.shape["D"]
    s = case.dtype.itemsize
    fwd = (n * d + v * d) * s + n * (8 + 6 * 4 + 8)
    bwd = 2 * (n * d + v * d) * s + n * (8 + 6 * 4)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.mode]


def truth(inputs: Inputs) -> Outputs:
    logits = torch.nn.functional.linear(inputs["hidden"], inputs["weight"])
    return reference.token_stats(logits, inputs["labels"], ignore_index=IGNORE_INDEX)._asdict()


def check_rows(case: Case) -> int:
    """Rows checked against float64: up to ~2^25 logits (the weight gradient only when all)."""
    return max(1, min(case.shape["N"], (1 << 25) // case.shape["V"]))


def tolerance_floor(case: Case, field: str) -> float:
    """As bench_token_stats: 1e-5 for fp32 stats, one 16-bit rounding for 16-bit gradients."""
    if field.startswith("grad:") and case.dtype != torch.float32:
        return 2.0**-8
    return 1e-5


def _fused(backend: str, order: str = "auto") -> Provider:
    """token_stats_from_hidden; `rows:<backend>` (opt-in) forces its backward into row chunks,
    to time the two orders in one run (the default: vocabulary blocks)."""

    def build(case: Case) -> Callable[[Inputs], Outputs]:
        why = _backend.op_unavailable_reason("token_stats", backend, case.device)
        if why is not None:
            raise Skip(why)
        return lambda x: pg_kernels.token_stats_from_hidden(
            x["hidden"], x["weight"], x["labels"], ignore_index=IGNORE_INDEX,
            backward_order=order, backend=backend,
        )._asdict()  # fmt: skip

    if order == "auto":
        return Provider(f"pg_kernels:{backend}", build)
    return Provider(f"{order}:{backend}", build, opt_in=True)


def loss(out: Outputs, inputs: Inputs) -> torch.Tensor:
    """bench_token_stats' loss of the statistics, or the loss a provider fused (out["loss"])."""
    return out["loss"] if "loss" in out else stats_loss(out, inputs)


def _token_loss(backend: str, order: str = "auto") -> Provider:
    """token_loss_from_hidden with this benchmark's loss: the gradients formed in the forward
    (3 matmuls in row chunks, 4 in vocabulary blocks). Its backward alone only scales them, so
    it has no "bwd" row. `token_loss_<order>:<backend>` (opt-in) forces `backward_order`, to
    time both orders in one run (the default: vocabulary blocks on CUDA, row chunks on a CPU)."""

    def build(case: Case) -> Callable[[Inputs], Outputs]:
        why = _backend.op_unavailable_reason("token_stats", backend, case.device)
        if why is not None or case.mode == "bwd":
            raise Skip(why or "its gradients are formed in the forward: see fwd+bwd")

        def fn(x: Inputs) -> Outputs:
            def loss_fn(s, rows):
                return sum((x[f"w_{f}"][rows] * getattr(s, f)).sum() for f in LOSS_FIELDS)

            out = pg_kernels.token_loss_from_hidden(
                x["hidden"], x["weight"], x["labels"], loss_fn, ignore_index=IGNORE_INDEX,
                backward_order=order, backend=backend,
            )  # fmt: skip
            return {**out.stats._asdict(), "loss": out.loss}

        return fn

    if order == "auto":
        return Provider(f"token_loss:{backend}", build)
    return Provider(f"token_loss_{order}:{backend}", build, opt_in=True)


def _unfused(backend: str) -> Provider:
    def build(case: Case) -> Callable[[Inputs], Outputs]:
        why = _backend.op_unavailable_reason("token_stats", backend, case.device)
        if why is not None:
            raise Skip(why)
        return lambda x: pg_kernels.token_stats(
            x["hidden"] @ x["weight"].t(), x["labels"], ignore_index=IGNORE_INDEX,
            backend=backend,
        )._asdict()  # fmt: skip

    return Provider(f"unfused:{backend}", build)


def _eager(case: Case) -> Callable[[Inputs], Outputs]:
    return lambda x: reference.token_stats(
        x["hidden"] @ x["weight"].t(), x["labels"], ignore_index=IGNORE_INDEX, upcast=False
    )._asdict()


def memory_summary(provider: str, shape: dict[str, int], records: list[dict]) -> list[str]:
    """Peak extra memory of fwd+bwd per provider at `shape`, as a share of N·V·4."""
    logits_mb = shape["N"] * shape["V"] * 4 / 2**20
    rows = [
        r
        for r in records
        if r["mode"] == "fwd+bwd" and r["shape"] == shape and r["peak_mem_mb"] is not None
    ]
    if not rows:
        return []
    lines = [
        f"## Peak extra memory, fwd+bwd at {'x'.join(map(str, shape.values()))}",
        "",
        f"Share of N·V·4 = {logits_mb:.0f} MB (the fp32 logits alone); CPU target for "
        f"{provider}: ≤ 20 %; GPU: no more than cce.",
        "",
        "| provider | dtype | peak MB | % of N·V·4 |",
        "|---|---|---|---|",
    ]
    # The GPU target is cce's peak at the same dtype (no cce row: no verdict), the CPU's 20 %.
    cce = {r["dtype"]: r["peak_mem_mb"] for r in rows if r["provider"] == "cce"}
    for r in rows:
        share = 100 * r["peak_mem_mb"] / logits_mb
        verdict = ""
        if r["provider"] == provider:
            if provider.endswith(":cpu"):
                verdict = " ✅" if share <= 20 else " ❌"
            elif r["dtype"] in cce:
                verdict = " ✅" if r["peak_mem_mb"] <= cce[r["dtype"]] else " ❌ (above cce)"
            else:
                verdict = " (no cce row)"
        lines.append(
            f"| {r['provider']} | {r['dtype']} | {r['peak_mem_mb']:.0f} | {share:.1f}{verdict} |"
        )
    return lines + [""]


def _liger_flce(case: Case) -> Callable[[Inputs], Outputs]:
    """Liger-Kernel's fused linear cross entropy, per token (log-prob only)."""
    if case.device.type != "cuda":
        raise Skip("Liger-Kernel needs CUDA tensors")
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as e:
        raise Skip(f"Liger-Kernel not installed ({e.name})") from None

    def fn(x: Inputs) -> Outputs:
        nll = liger_fused_linear_cross_entropy(
            x["hidden"], x["weight"], x["labels"], ignore_index=IGNORE_INDEX, reduction="none"
        )
        return {"logprob": -nll}

    return fn


def _cce(case: Case) -> Callable[[Inputs], Outputs]:
    """Cut-Cross-Entropy (its Triton "cce" implementation), per token (log-prob only)."""
    if case.device.type != "cuda":
        raise Skip("Cut-Cross-Entropy needs CUDA tensors")
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as e:
        raise Skip(f"Cut-Cross-Entropy not installed ({e.name})") from None

    def fn(x: Inputs) -> Outputs:
        nll = linear_cross_entropy(
            x["hidden"], x["weight"], x["labels"], ignore_index=IGNORE_INDEX, reduction="none"
        )
        return {"logprob": -nll}

    return fn


def make_bench(device: torch.device, temperature: float = 1.0) -> OpBench:
    if temperature != 1.0:
        raise SystemExit(f"{OP}: --temperature is not supported by this benchmark")
    backends = ("cpu",) if device.type == "cpu" else ("triton", "cuda")
    providers = [_fused(b) for b in backends] + [_token_loss(b) for b in backends]
    providers += [_fused(b, "rows") for b in backends]
    providers += [_token_loss(b, order) for b in backends for order in ("rows", "vocab")]
    providers += [_unfused(b) for b in backends]
    providers.append(Provider("eager", _eager))
    providers += [Provider("liger_flce", _liger_flce, peer=True), Provider("cce", _cce, peer=True)]
    main = f"pg_kernels:{backends[0]}"
    unfused = f"unfused:{backends[0]}"
    if device.type == "cpu":
        shape = TARGET_SHAPE
        targets = [
            Target(f"fwd+bwd / {unfused} ≤ 1.3", "fwd+bwd", unfused, at_most=1.3),
            Target("fwd+bwd ×eager", "fwd+bwd", "eager"),
        ]
    else:  # no more memory than Cut-Cross-Entropy, within 1.1x its time, ahead of Liger's
        shape = GPU_SHAPE
        targets = [
            Target("fwd+bwd / cce ≤ 1.1", "fwd+bwd", "cce", at_most=1.1),
            Target("fwd+bwd ×liger_flce ≥ 1", "fwd+bwd", "liger_flce", at_least=1.0),
            Target(f"fwd+bwd / {unfused}", "fwd+bwd", unfused, time_ratio=True),
        ]
    at = "x".join(map(str, shape.values()))
    summary = harness.targets_summary(f"Targets at {at}", main, shape, targets)
    fused_loss = f"token_loss:{backends[0]}"
    loss_summary = harness.targets_summary(
        f"{fused_loss} (the loss fused: gradients formed in the forward) at {at}", fused_loss,
        shape, [Target(f"fwd+bwd / {unfused} ≤ 1.3", "fwd+bwd", unfused, at_most=1.3)],
    )  # fmt: skip
    return OpBench(
        op=OP,
        shape_dims=DIMS,
        make_inputs=make_inputs,
        grad_inputs=("hidden", "weight"),
        shared_inputs=("weight",),
        loss=loss,
        bytes_moved=bytes_moved,
        truth=truth,
        check_fields=CHECK_FIELDS,
        check_rows=check_rows,
        tolerance_floor=tolerance_floor,
        providers=providers,
        ceilings={},
        ceiling_rows={},
        baselines=(unfused, "eager", "liger_flce", "cce"),
        extra_versions=harness.installed_versions("liger-kernel", "cut-cross-entropy"),
        notes=[
            "matmul-bound: GB/s counts only hidden, weight and per-row tensors; compare times "
            "and peak memory",
        ],
        summaries=[summary, loss_summary, functools.partial(memory_summary, main, shape)],
    )


if __name__ == "__main__":
    sys.exit(harness.main(make_bench, default_shapes, DIMS, OP))
