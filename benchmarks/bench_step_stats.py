"""Benchmark of pg_kernels.step_stats: token_stats + mismatch (rollout logits) + KL to a teacher in
one read of each logits tensor, against the three ops called one after the other.

    python benchmarks/bench_step_stats.py [--device cpu|cuda] [--quick] [--shapes NxV ...]
        [--dtypes fp32 bf16] [--modes fwd bwd fwd+bwd] [--temperature T] [--out benchmarks/out]

Every statistic is computed: TokenStats, MismatchStats with token_kl and token_tv, and the
reverse KL to the teacher. The backward modes differentiate
loss = sum(w1 logprob + w2 entropy + w3 kl) (the policy's gradient, written once by the bundle;
by the single ops twice, token_stats' and kl_divergence's, then added: mismatch_stats' outputs
are not in the loss). Providers: pg_kernels' bundle on every backend with a kernel
here, the same with `token_tv=False` (`no_tv:<backend>`), `separate:<backend>` (token_stats,
mismatch_stats, kl_divergence) and the eager references.

Target (forward): the bundle's time <= 1.1 x (token_stats of the logits + the reads of the
other two tensors). "A read" is what a one-pass kernel over one tensor costs on this device:
on a GPU the memory read (`amax`); on a CPU, where the exps, not the memory, are the floor, the
token_stats kernel itself on that tensor (`ts:<tensor>`: one exp per element, the least a
softmax normalizer costs).

Bytes moved (minimum), s = the logits' itemsize:
  fwd      3 N V s + N * 16 (label, rollout log-prob) + N * 80 (20 outputs); a GPU reads the
           logits and the rollout logits again for token_tv (5 N V s; `no_tv` skips that)
  bwd      2 N V s (logits read, gradient written; the teacher is not differentiated here, and
           its reverse-KL term needs it: + N V s) = 3 N V s + N * 16
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
from benchmarks.harness import (
    Case,
    Ceiling,
    CeilingRow,
    Inputs,
    OpBench,
    Outputs,
    Provider,
    Skip,
    Target,
)
from pg_kernels import _backend, reference

OP = "step_stats"
DIMS = ("N", "V")
CHECK_FIELDS = ("logprob", "entropy", "collision", "lse", "token_kl", "token_tv", "k3", "kl")
LOGIT_STD = 2.0
ROLLOUT_NOISE = 0.05  # rollout engine vs trainer: a small numeric mismatch
TEACHER_NOISE = 1.0  # the teacher: another model


def default_shapes(device: torch.device, quick: bool) -> list[dict[str, int]]:
    if device.type == "cuda":
        return [{"N": 4096, "V": 151936}, {"N": 16384, "V": 151936}]
    if quick:
        return [{"N": 256, "V": 32000}]
    return [{"N": 1024, "V": 32000}]


def make_inputs(case: Case, seed: int) -> Inputs:
    """logits, rollout_logits, ref_logits [N, V], labels, rollout_logprobs, loss weights [N]."""
    n, v = case.shape["N"], case.shape["V"]
    gen = torch.Generator(device=case.device).manual_seed(5000 + seed)
    logits = torch.empty(n, v, dtype=case.dtype, device=case.device)
    rollout, ref = torch.empty_like(logits), torch.empty_like(logits)
    rollout_lp = torch.empty(n, device=case.device)
    labels = torch.randint(0, v, (n,), generator=gen, device=case.device)
    block = max(1, (1 << 26) // v)
    for r in range(0, n, block):
        rows = min(block, n - r)

        def noise(std, rows=rows):
            return torch.randn(rows, v, generator=gen, device=case.device) * std

        chunk = noise(LOGIT_STD)
        noisy = chunk + noise(ROLLOUT_NOISE)
        logits[r : r + rows] = chunk.to(case.dtype)
        rollout[r : r + rows] = noisy.to(case.dtype)
        ref[r : r + rows] = (chunk + noise(TEACHER_NOISE)).to(case.dtype)
        lp = noisy.log_softmax(-1).gather(-1, labels[r : r + rows, None])[:, 0]
        rollout_lp[r : r + rows] = lp
    w = torch.randn(n, 3, generator=gen, device=case.device)  # row-leading: sliced with the rows
    return {"logits": logits, "rollout_logits": rollout, "ref_logits": ref, "labels": labels,
            "rollout_logprobs": rollout_lp, "w": w}  # fmt: skip


def loss(out: Outputs, inputs: Inputs) -> torch.Tensor:
    w = inputs["w"]
    return (w[:, 0] * out["logprob"] + w[:, 1] * out["entropy"] + w[:, 2] * out["kl"]).sum()


def bytes_moved(case: Case) -> int:
    n, v = case.shape["N"], case.shape["V"]
    nv = n * v * case.dtype.itemsize
    fwd, bwd = 3 * nv + n * 96, 3 * nv + n * 16
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.mode]


def _fields(token, mismatch, kl) -> Outputs:
    out = {k: v for k, v in token._asdict().items() if k != "argmax"}
    out.update(token_kl=mismatch.token_kl, token_tv=mismatch.token_tv, k3=mismatch.k3, kl=kl)
    return {k: v for k, v in out.items() if v is not None}


def _args(inputs: Inputs):
    return (inputs["logits"], inputs["labels"], inputs["rollout_logprobs"],
            inputs["rollout_logits"], inputs["ref_logits"])  # fmt: skip


def _reference(x, y, lp, xr, xq, temperature, upcast):
    out = reference.step_stats(x, y, rollout_logprobs=lp, rollout_logits=xr, ref_logits=xq,
                               temperature=temperature, upcast=upcast)  # fmt: skip
    return _fields(out.token, out.mismatch, out.kl)


def truth(inputs: Inputs, temperature: float = 1.0) -> Outputs:
    return _reference(*_args(inputs), temperature, upcast=True)


def check_rows(case: Case) -> int:
    return max(1, min(case.shape["N"], (1 << 23) // case.shape["V"]))


def tolerance_floor(case: Case, field: str) -> float:
    if field.startswith("grad:") and case.dtype != torch.float32:
        return 2.0**-8
    return 1e-5


def _unavailable(backend: str, device: torch.device, op: str = OP) -> None:
    why = _backend.op_unavailable_reason(op, backend, device)
    if why is not None:
        raise Skip(why)


def _bundle(backend: str, temperature: float, tv: bool = True) -> Provider:
    """step_stats; `no_tv:<backend>` with token_tv=False (no TV, whose second read of the logits
    and the rollout logits on a GPU the bundle's one read per tensor leaves out)."""

    def build(case: Case):
        _unavailable(backend, case.device)

        def fn(inputs: Inputs) -> Outputs:
            x, y, lp, xr, xq = _args(inputs)
            out = pg_kernels.step_stats(x, y, rollout_logprobs=lp, rollout_logits=xr,
                                        ref_logits=xq, temperature=temperature, token_tv=tv,
                                        backend=backend)  # fmt: skip
            return _fields(out.token, out.mismatch, out.kl)

        return fn

    return Provider(f"{'pg_kernels' if tv else 'no_tv'}:{backend}", build)


def _separate(backend: str, temperature: float) -> Provider:
    def build(case: Case):
        for op in ("token_stats", "mismatch_stats", "kl_divergence"):
            _unavailable(backend, case.device, op)

        def fn(inputs: Inputs) -> Outputs:
            x, y, lp, xr, xq = _args(inputs)
            kw = dict(temperature=temperature, backend=backend)
            token = pg_kernels.token_stats(x, y, **kw)
            mismatch = pg_kernels.mismatch_stats(x, y, lp, rollout_logits=xr, **kw)
            kl = pg_kernels.kl_divergence(x, xq, **kw)
            return _fields(token, mismatch, kl)

        return fn

    return Provider(f"separate:{backend}", build)


def _eager(case: Case, temperature: float):
    return lambda inputs: _reference(*_args(inputs), temperature, upcast=False)


def token_stats_ceiling(tensor: str, backend: str, temperature: float) -> Ceiling:
    """pg_kernels' token_stats over inputs[tensor]: the cost of one read of a tensor by a kernel
    that computes its softmax normalizer (one exp per element; the CPU's floor of a read)."""
    return Ceiling(
        f"ts:{tensor}",
        prepare=lambda inputs: (inputs[tensor], inputs["labels"]),
        run=lambda st: pg_kernels.token_stats(
            st[0], st[1], temperature=temperature, backend=backend
        ),  # fmt: skip
        bytes=lambda c: c.shape["N"] * c.shape["V"] * c.dtype.itemsize,
    )


def make_bench(device: torch.device, temperature: float = 1.0) -> OpBench:
    backends = ("cpu",) if device.type == "cpu" else ("triton",)
    providers = [_bundle(b, temperature, tv) for b in backends for tv in (True, False)]
    providers += [_separate(b, temperature) for b in backends]
    providers.append(Provider("eager", functools.partial(_eager, temperature=temperature)))
    tensors = ("logits", "rollout_logits", "ref_logits")
    ceilings = {f"amax:{t}": harness.amax_ceiling(t) for t in tensors}
    ceilings["copy"] = harness.copy_ceiling()
    reads = tuple(f"amax:{t}" for t in tensors)
    rows: dict[str, list[CeilingRow]] = {
        "fwd": [CeilingRow(reads)],
        "bwd": [CeilingRow(("amax:logits", "amax:ref_logits", "copy"))],
        "fwd+bwd": [CeilingRow((*reads, "amax:ref_logits", "copy"))],
    }
    if device.type == "cpu":
        for t in tensors:
            ceilings[f"ts:{t}"] = token_stats_ceiling(t, "cpu", temperature)
        ts = tuple(f"ts:{t}" for t in tensors)
        rows["fwd"].append(CeilingRow(ts, "floor"))
        target = Target("fwd / (token_stats + 2 reads) ≤ 1.1", "fwd", "ceiling:" + "+".join(ts),
                        at_most=1.1)  # fmt: skip
        shape, title = {"N": 1024, "V": 32000}, "CPU forward at 1024×32000"
    else:
        target = Target("fwd / 3 reads ≤ 1.1", "fwd", "ceiling:" + "+".join(reads), at_most=1.1)
        shape, title = {"N": 16384, "V": 151936}, "GPU forward at 16384×151936"
    summaries = [
        harness.targets_summary(
            f"Targets: {title}",
            f"pg_kernels:{b}",
            shape,
            [
                target,
                Target("fwd ×separate", "fwd", f"separate:{b}"),
                Target("fwd+bwd ×separate", "fwd+bwd", f"separate:{b}"),
                Target("fwd ×eager", "fwd", "eager"),
            ],
        )  # fmt: skip
        for b in backends
    ] + [
        harness.targets_summary(
            f"token_tv=False: {title}",
            f"no_tv:{b}",
            shape,
            [target, Target("fwd / with token_tv", "fwd", f"pg_kernels:{b}", time_ratio=True)],
        )  # fmt: skip
        for b in backends
    ]
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
        notes=["every field: TokenStats, MismatchStats with token_kl and token_tv, reverse KL"],
        summaries=summaries,
        # The CPU target's ratio, also timed as back-to-back pairs (harness._paired_ratio).
        paired=tuple(
            (f"{name}:{b}", target.against) for b in backends for name in ("pg_kernels", "no_tv")
        )
        if device.type == "cpu"
        else (),
    )


if __name__ == "__main__":
    sys.exit(harness.main(make_bench, default_shapes, DIMS, OP))
