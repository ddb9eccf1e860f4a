"""Benchmark of pg_kernels.token_stats: shapes, providers, bytes moved. No timing code here.

    python benchmarks/bench_token_stats.py [--device cpu|cuda] [--quick] [--shapes NxV ...]
        [--dtypes fp32 bf16] [--modes fwd bwd fwd+bwd] [--temperature T] [--out benchmarks/out]

Providers: pg_kernels on every backend this device can run (cpu; triton and cuda on a GPU),
the eager reference (`reference.token_stats(..., upcast=False)`, what a plain PyTorch trainer
computes), `torch.compile` of it, and on GPU the log-prob-only cross entropies of Liger-Kernel
and flash-attention when installed; opt-in (named by --providers): the Triton blockings
(`triton@...`), `top32:cuda`, the CUDA kernel with each chunk's top thread summed in fp32
(PGK_CUDA_TOP_SUMS=0), to time `top_vector_sums` in one build, and `lane32:triton`, the Triton
kernel with the lane holding each chunk's max left in fp32 (`lane_sums64` off). The backward
modes differentiate
loss = sum(w_lp * logprob + w_H * entropy + w_C * collision) with random per-row weights, so
every gradient term runs (peers without entropy/collision get the logprob term only).

Bytes moved (the minimum an ideal kernel moves), s = logits' itemsize:
  fwd      N*V*s logits + N*8 labels + N*32 outputs (6 fp32 stats + int64 argmax)
  bwd      N*V*s logits + N*V*s grad + N*32 (labels, saved lse/entropy/collision, 3 upstream)
  fwd+bwd  the sum of both.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `pg_kernels` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pg_kernels
from benchmarks import harness
from benchmarks.harness import (
    Case,
    Ceiling,
    Inputs,
    OpBench,
    Outputs,
    Provider,
    Skip,
    Target,
)
from pg_kernels import _backend, reference

OP = "token_stats"
DIMS = ("N", "V")
LOSS_FIELDS = ("logprob", "entropy", "collision")
CHECK_FIELDS = ("logprob", "entropy", "collision", "lgp", "lse", "max_prob")
IGNORE_INDEX = -100
LOGIT_STD = 2.0  # peaked enough to look like a language model's logits, never all equal
# label in; logprob, entropy, collision, lgp, lse, max_prob (fp32) and argmax (int64) out
ROW_BYTES_FWD = 8 + 6 * 4 + 8
ROW_BYTES_BWD = 8 + 3 * 4 + 3 * 4  # label, saved lse/entropy/collision, upstream grads of 3 stats


def default_shapes(device: torch.device, quick: bool) -> list[dict[str, int]]:
    """CPU: a 32k and a 152k vocabulary. GPU: N in {1, 512, 4096, 16384} x four vocabularies."""
    if device.type == "cuda":
        if quick:
            return [{"N": n, "V": v} for n, v in ((4096, 32000), (4096, 151936), (1, 151936))]
        vocabs, rows = (32000, 128256, 151936, 262144), (1, 512, 4096, 16384)
        return [{"N": n, "V": v} for v in vocabs for n in rows]
    if quick:
        return [{"N": 256, "V": 32000}]
    return [{"N": 1024, "V": 32000}, {"N": 512, "V": 151936}]


# ----------------------------------------------------------------------------- inputs and loss


def make_inputs(case: Case, seed: int) -> Inputs:
    """logits [N, V] (dtype of the case), labels [N] int64, loss weights [N] fp32; all random."""
    n, v = case.shape["N"], case.shape["V"]
    gen = torch.Generator(device=case.device).manual_seed(1000 + seed)
    logits = torch.empty(n, v, dtype=case.dtype, device=case.device)
    # Fill in row blocks: a full fp32 draw of a [16384, 262144] bf16 tensor would need 17 GB.
    block = max(1, (1 << 26) // v)
    for r in range(0, n, block):
        rows = min(block, n - r)
        chunk = torch.randn(rows, v, generator=gen, device=case.device) * LOGIT_STD
        logits[r : r + rows] = chunk.to(case.dtype)
    labels = torch.randint(0, v, (n,), generator=gen, device=case.device)
    weights = {
        f"w_{f}": torch.randn(n, generator=gen, device=case.device) for f in LOSS_FIELDS
    }  # random upstream gradients: all-ones would let a kernel skip a term and still pass
    return {"logits": logits, "labels": labels, **weights}


def loss(out: Outputs, inputs: Inputs) -> torch.Tensor:
    """sum over rows of w_f * stat_f for the loss fields the provider produced."""
    terms = [(inputs[f"w_{f}"] * out[f]).sum() for f in LOSS_FIELDS if f in out]
    return torch.stack(terms).sum()


def bytes_moved(case: Case) -> int:
    n, v = case.shape["N"], case.shape["V"]
    s = case.dtype.itemsize
    fwd = n * v * s + n * ROW_BYTES_FWD
    bwd = 2 * n * v * s + n * ROW_BYTES_BWD
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.mode]


def truth(inputs: Inputs, temperature: float = 1.0) -> Outputs:
    """The float64 reference (the inputs arrive already upcast)."""
    out = reference.token_stats(
        inputs["logits"], inputs["labels"], temperature=temperature,
        ignore_index=IGNORE_INDEX, upcast=True,
    )  # fmt: skip
    return out._asdict()


def check_rows(case: Case) -> int:
    """Rows checked against float64: all of them up to ~32M elements (~2-3 GB of float64)."""
    return max(1, min(case.shape["N"], (1 << 25) // case.shape["V"]))


def tolerance_floor(case: Case, field: str) -> float:
    """Added to twice the eager reference's own error (flash-attention's rule).

    Stats are fp32 whatever the input dtype: a 1e-5 floor is ~100 fp32 ulps of slack for
    one-pass summation orders that differ from PyTorch's. Gradients come back in the logits'
    dtype, so their floor is one rounding of that dtype (2^-8 for bf16).
    """
    if field.startswith("grad:") and case.dtype != torch.float32:
        return 2.0**-8
    return 1e-5


# ----------------------------------------------------------------------------- providers


def _ref_fn(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> pg_kernels.TokenStats:
    return reference.token_stats(
        logits, labels, temperature=temperature, ignore_index=IGNORE_INDEX, upcast=False
    )


def _pg_provider(backend: str, temperature: float) -> Provider:
    def build(case: Case) -> Callable[[Inputs], Outputs]:
        why = _backend.op_unavailable_reason(OP, backend, case.device)
        if why is not None:
            raise Skip(why)

        def fn(inputs: Inputs) -> Outputs:
            return pg_kernels.token_stats(
                inputs["logits"], inputs["labels"], temperature=temperature,
                ignore_index=IGNORE_INDEX, backend=backend,
            )._asdict()  # fmt: skip

        return fn

    return Provider(f"pg_kernels:{backend}", build)


def _top32_provider(temperature: float) -> Provider:
    """The CUDA kernel with each chunk's top thread summed in fp32 like the others
    (PGK_CUDA_TOP_SUMS=0: its arithmetic before `top_vector_sums`), timed beside the default to
    price that epilogue in one build (opt-in; the GPU check's step `bench`)."""

    def build(case: Case) -> Callable[[Inputs], Outputs]:
        why = _backend.op_unavailable_reason(OP, "cuda", case.device)
        if why is not None:
            raise Skip(why)

        def fn(inputs: Inputs) -> Outputs:
            before = os.environ.get("PGK_CUDA_TOP_SUMS")
            os.environ["PGK_CUDA_TOP_SUMS"] = "0"
            try:
                return pg_kernels.token_stats(
                    inputs["logits"], inputs["labels"], temperature=temperature,
                    ignore_index=IGNORE_INDEX, backend="cuda",
                )._asdict()  # fmt: skip
            finally:
                if before is None:
                    del os.environ["PGK_CUDA_TOP_SUMS"]
                else:
                    os.environ["PGK_CUDA_TOP_SUMS"] = before

        return fn

    return Provider("top32:cuda", build, opt_in=True)


def _lane32_provider(temperature: float) -> Provider:
    """The Triton kernel with the lane holding each chunk's max left in fp32 (its 16-bit
    forward before `token_stats.lane_sums64`), timed beside the default to price that epilogue
    in one run (opt-in; the GPU check's step `bench`)."""

    def build(case: Case) -> Callable[[Inputs], Outputs]:
        why = _backend.op_unavailable_reason(OP, "triton", case.device)
        if why is not None:
            raise Skip(why)
        from pg_kernels.triton import token_stats as triton_token_stats

        def fn(inputs: Inputs) -> Outputs:
            with triton_token_stats.lane_resum_off():
                return pg_kernels.token_stats(
                    inputs["logits"], inputs["labels"], temperature=temperature,
                    ignore_index=IGNORE_INDEX, backend="triton",
                )._asdict()  # fmt: skip

        return fn

    return Provider("lane32:triton", build, opt_in=True)


def _eager(temperature: float) -> Provider:
    def build(case: Case) -> Callable[[Inputs], Outputs]:
        return lambda inputs: _ref_fn(inputs["logits"], inputs["labels"], temperature)._asdict()

    return Provider("eager", build)


def _compile(temperature: float) -> Provider:
    def build(case: Case) -> Callable[[Inputs], Outputs]:
        key = (case.device.type, case.dtype, tuple(case.shape.items()), temperature)
        compiled = harness.compile_once(_ref_fn, key)
        return lambda inputs: compiled(inputs["logits"], inputs["labels"], temperature)._asdict()

    return Provider("compile", build)


def _liger(case: Case, temperature: float = 1.0) -> Callable[[Inputs], Outputs]:
    if case.device.type != "cuda":
        raise Skip("Liger-Kernel needs CUDA tensors")
    if temperature != 1.0:
        raise Skip("Liger-Kernel's cross entropy takes no temperature")
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except ImportError as e:
        raise Skip(f"Liger-Kernel not installed ({e.name})") from None

    def fn(inputs: Inputs) -> Outputs:
        out = liger_cross_entropy(
            inputs["logits"], inputs["labels"], ignore_index=IGNORE_INDEX, reduction="none"
        )
        out = getattr(out, "loss", out)  # newer versions return a CrossEntropyOutput
        out = out[0] if isinstance(out, tuple) else out
        return {"logprob": -out}

    return fn


def _flash(case: Case, temperature: float = 1.0) -> Callable[[Inputs], Outputs]:
    if case.device.type != "cuda":
        raise Skip("flash-attention's cross entropy needs CUDA tensors")
    if temperature != 1.0:
        raise Skip("flash-attention's cross entropy takes no temperature")
    try:
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss
    except ImportError as e:
        raise Skip(f"flash-attn not installed ({e.name})") from None

    def fn(inputs: Inputs) -> Outputs:
        losses, _ = cross_entropy_loss(
            inputs["logits"], inputs["labels"], ignore_index=IGNORE_INDEX
        )
        return {"logprob": -losses}

    return fn


# A Triton kernel's blocking: (elements per loop step, steps per program) of the forward's chunk
# kernel and of the backward, as `row_blocking` takes them (`_block_v`, `_chunk`); None keeps a
# kernel's default. Opt-in providers named `triton@F<step>x<steps>` / `triton@B<step>x<steps>`
# time one kernel's variant beside the other's default: the tuning sweep of the Triton forward
# (1.72x one read on the H200, where the CUDA kernel's 1.04x reads 128 KiB per work item) and of
# the backward (1.33x a copy). bf16 defaults: forward 16384 x 2 (5 programs per row of 151936),
# backward 4096 x 4 (10).
TRITON_BLOCKINGS = (
    ((16384, 2), None), ((16384, 1), None), ((16384, 4), None), ((16384, 10), None),
    ((8192, 4), None), ((8192, 8), None),
    (None, (4096, 8)), (None, (8192, 4)), (None, (8192, 8)), (None, (2048, 8)),
)  # fmt: skip


def _blocking_name(fwd: tuple[int, int] | None, bwd: tuple[int, int] | None) -> str:
    parts = [f"{k}{b[0]}x{b[1]}" for k, b in (("F", fwd), ("B", bwd)) if b is not None]
    return "triton@" + "".join(parts)


def _blocking_args(blocking: tuple[int, int] | None) -> dict[str, int]:
    """A launcher's private overrides for (elements per step, steps per program)."""
    if blocking is None:
        return {}
    step, steps = blocking
    return {"_block_v": step, "_chunk": step * steps}


class _TritonBlocked(torch.autograd.Function):
    """token_stats through the Triton launchers with explicit blockings (outputs and gradient as
    the op's; blocking changes only the order of the fp32 sums)."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, fwd, bwd):
        from pg_kernels.ops._common import row_layout
        from pg_kernels.triton import token_stats as tt

        layout = row_layout(OP, "logits", logits)
        outs = tt.token_stats_forward(
            logits, labels, None, temperature, IGNORE_INDEX, *layout, **_blocking_args(fwd)
        )
        _, entropy, collision, _, lse, max_prob, argmax = outs
        ctx.save_for_backward(logits, labels, lse, entropy, collision, max_prob, argmax)
        ctx.layout, ctx.temperature, ctx.bwd = layout, temperature, bwd
        ctx.mark_non_differentiable(outs[3], max_prob, argmax)
        return tuple(outs)

    @staticmethod
    def backward(ctx, g_lp, g_h, g_c, g_lgp, g_lse, g_mp, g_am):
        from pg_kernels.triton import token_stats as tt

        logits, labels, lse, entropy, collision, max_prob, argmax = ctx.saved_tensors
        zero = torch.zeros_like(lse)
        g = [zero if t is None else t for t in (g_lp, g_h, g_c, g_lse)]
        grad = tt.token_stats_backward(
            *g, logits, labels, None, ctx.temperature, IGNORE_INDEX, lse, entropy, collision,
            max_prob, argmax, *ctx.layout, **_blocking_args(ctx.bwd),
        )  # fmt: skip
        return grad, None, None, None, None


def _triton_blocked(
    fwd: tuple[int, int] | None, bwd: tuple[int, int] | None, temperature: float
) -> Provider:
    def build(case: Case) -> Callable[[Inputs], Outputs]:
        why = _backend.op_unavailable_reason(OP, "triton", case.device)
        if why is not None:
            raise Skip(why)

        def fn(inputs: Inputs) -> Outputs:
            outs = _TritonBlocked.apply(inputs["logits"], inputs["labels"], temperature, fwd, bwd)
            return dict(zip(pg_kernels.TokenStats._fields, outs))

        return fn

    return Provider(_blocking_name(fwd, bwd), build, opt_in=True)


def blocking_providers() -> list[str]:
    """The names of the opt-in blocking variants, TRITON_BLOCKINGS' order (gpu_check's tune)."""
    return [_blocking_name(f, b) for f, b in TRITON_BLOCKINGS]


# ----------------------------------------------------------------------------- ceilings


def _amax() -> Ceiling:
    return Ceiling(
        "amax",
        prepare=lambda inputs: inputs["logits"],
        run=lambda x: torch.amax(x, -1),
        bytes=lambda c: (
            c.shape["N"] * c.shape["V"] * c.dtype.itemsize + c.shape["N"] * c.dtype.itemsize
        ),
    )


# ----------------------------------------------------------------------------- targets


CPU_SHAPE = {"N": 1024, "V": 32000}
# The CPU forward targets, and the GPU ones (bf16 at [16384, 151936]).
CPU_TARGETS = harness.targets_summary(
    "Targets: CPU forward at 1024×32000",
    "pg_kernels:cpu",
    CPU_SHAPE,
    [
        Target("×eager ≥ 8", "fwd", "eager", at_least=8),
        Target("×compile ≥ 1.3", "fwd", "compile", at_least=1.3),
        Target("ms / ms(exp) ≤ 1.5", "fwd", "ceiling:exp", at_most=1.5),
    ],
    memory=True,
)


def gpu_targets(backend: str):
    return harness.targets_summary(
        f"Targets: {backend} at 16384×151936",
        f"pg_kernels:{backend}",
        {"N": 16384, "V": 151936},
        [
            Target("fwd / amax ≤ 1.05", "fwd", "ceiling:amax", at_most=1.05),
            Target("fwd+bwd / (amax+copy) ≤ 1.1", "fwd+bwd", "ceiling:amax+copy", at_most=1.1),
            Target("fwd ×eager", "fwd", "eager"),
            Target("fwd ×compile", "fwd", "compile"),
            Target("fwd+bwd ×liger", "fwd+bwd", "liger"),
        ],
    )


# ----------------------------------------------------------------------------- declaration


def make_bench(device: torch.device, temperature: float = 1.0) -> OpBench:
    providers: list[Provider] = []
    notes: list[str] = []
    backends = ("cpu",) if device.type == "cpu" else ("triton", "cuda")
    for b in backends:
        providers.append(_pg_provider(b, temperature))
    if device.type == "cuda":
        providers += [_top32_provider(temperature), _lane32_provider(temperature)]
    if device.type == "cpu":
        notes.append(
            "pg_kernels:triton not timed on CPU: the Triton interpreter is not a performance path"
        )
    providers += [
        _eager(temperature),
        _compile(temperature),
        # Liger writes the gradient into the logits during its forward: give it its own copies.
        Provider(
            "liger",
            functools.partial(_liger, temperature=temperature),
            mutates_inputs=True,
            peer=True,
        ),
        Provider("flash_attn", functools.partial(_flash, temperature=temperature), peer=True),
        *(_triton_blocked(f, b, temperature) for f, b in TRITON_BLOCKINGS),
    ]
    # amax / copy rows; on a CPU the floor is one exp per element per pass.
    ceilings, rows = harness.one_read_ceilings(device, _amax())
    peers = ("liger-kernel", "flash-attn")
    extra = harness.installed_versions(*peers) if device.type == "cuda" else {}
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
        notes=notes,
        extra_versions=extra,
        summaries=[CPU_TARGETS] if device.type == "cpu" else [gpu_targets(b) for b in backends],
        paired=(("pg_kernels:cpu", "ceiling:exp"),),  # the CPU target's ratio, back to back
    )


if __name__ == "__main__":
    sys.exit(harness.main(make_bench, default_shapes, DIMS, OP))
