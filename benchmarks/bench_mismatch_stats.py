"""Benchmark of pg_kernels.mismatch_stats with rollout logits (exact token KL and TV).

    python benchmarks/bench_mismatch_stats.py [--device cpu|cuda] [--quick] [--shapes NxV ...]
        [--dtypes fp32 bf16] [--modes fwd bwd fwd+bwd] [--temperature T] [--out benchmarks/out]

Every field of MismatchStats is computed: logprob, the sampled estimators against the rollout
engine's log-probs, and token_kl = KL(pi_roll || pi_theta), token_tv = 1/2 sum |p - q| from the
rollout logits. The backward modes differentiate loss = sum(w * logprob) (the only
differentiable field). Providers: pg_kernels on every backend with a kernel here (cpu), the
same with `token_tv=False` (`no_tv:<backend>`: no TV, whose normalizers a GPU kernel knows only
after a first read of both tensors, so it reads them again), the eager reference
(`reference.mismatch_stats(..., upcast=False)`) and `torch.compile` of it.

Bytes moved (minimum), s = the logits' itemsize:
  fwd      2 N V s (logits, rollout_logits) + N * 16 (label, rollout log-prob) + N * 48 (12 out)
           (a GPU reads both tensors again for token_tv: 4 N V s; `no_tv` skips that)
  bwd      N V s read + N V s grad written + N * 16
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
from benchmarks import bench_kl_divergence, harness
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

OP = "mismatch_stats"
DIMS = ("N", "V")
CHECK_FIELDS = ("logprob", "log_ratio", "ratio", "k3", "chi2", "token_kl", "token_tv")
LOGIT_STD = 2.0
ROLLOUT_NOISE = 0.05  # rollout engine vs trainer: a small numeric mismatch


def default_shapes(device: torch.device, quick: bool) -> list[dict[str, int]]:
    if device.type == "cuda":
        return [{"N": 4096, "V": 32000}, {"N": 4096, "V": 151936}]
    if quick:
        return [{"N": 256, "V": 32000}]
    return [{"N": 1024, "V": 32000}, {"N": 512, "V": 151936}]


def make_inputs(case: Case, seed: int) -> Inputs:
    """logits, rollout_logits [N, V], labels [N], rollout_logprobs [N], loss weights [N]."""
    n, v = case.shape["N"], case.shape["V"]
    gen = torch.Generator(device=case.device).manual_seed(3000 + seed)
    logits = torch.empty(n, v, dtype=case.dtype, device=case.device)
    rollout = torch.empty_like(logits)
    rollout_lp = torch.empty(n, device=case.device)
    labels = torch.randint(0, v, (n,), generator=gen, device=case.device)
    block = max(1, (1 << 26) // v)
    for r in range(0, n, block):
        rows = min(block, n - r)
        chunk = torch.randn(rows, v, generator=gen, device=case.device) * LOGIT_STD
        noisy = chunk + torch.randn(rows, v, generator=gen, device=case.device) * ROLLOUT_NOISE
        logits[r : r + rows] = chunk.to(case.dtype)
        rollout[r : r + rows] = noisy.to(case.dtype)
        lp = noisy.log_softmax(-1).gather(-1, labels[r : r + rows, None])[:, 0]
        rollout_lp[r : r + rows] = lp
    w = torch.randn(n, generator=gen, device=case.device)
    return {
        "logits": logits,
        "rollout_logits": rollout,
        "labels": labels,
        "rollout_logprobs": rollout_lp,
        "w": w,
    }


def loss(out: Outputs, inputs: Inputs) -> torch.Tensor:
    return (inputs["w"] * out["logprob"]).sum()


def bytes_moved(case: Case) -> int:
    n, v = case.shape["N"], case.shape["V"]
    s = case.dtype.itemsize
    fwd = 2 * n * v * s + n * 16 + n * 48
    bwd = 2 * n * v * s + n * 16
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.mode]


def _fields(out) -> Outputs:
    return {k: v for k, v in out._asdict().items() if isinstance(v, torch.Tensor)}


def truth(inputs: Inputs, temperature: float = 1.0) -> Outputs:
    return _fields(
        reference.mismatch_stats(
            inputs["logits"], inputs["labels"], inputs["rollout_logprobs"],
            rollout_logits=inputs["rollout_logits"], temperature=temperature, upcast=True,
        )
    )  # fmt: skip


def check_rows(case: Case) -> int:
    return max(1, min(case.shape["N"], (1 << 24) // case.shape["V"]))


def tolerance_floor(case: Case, field: str) -> float:
    if field.startswith("grad:") and case.dtype != torch.float32:
        return 2.0**-8
    return 1e-5


def _ref_fn(logits, labels, rollout_logprobs, rollout_logits, temperature):
    return reference.mismatch_stats(
        logits, labels, rollout_logprobs, rollout_logits=rollout_logits,
        temperature=temperature, upcast=False,
    )  # fmt: skip


def _args(inputs: Inputs):
    return inputs["logits"], inputs["labels"], inputs["rollout_logprobs"], inputs["rollout_logits"]


def _pg_provider(backend: str, temperature: float, tv: bool = True) -> Provider:
    def build(case: Case):
        why = _backend.op_unavailable_reason(OP, backend, case.device)
        if why is not None:
            raise Skip(why)

        def fn(inputs: Inputs) -> Outputs:
            x, y, lp, xr = _args(inputs)
            return _fields(
                pg_kernels.mismatch_stats(
                    x, y, lp, rollout_logits=xr, temperature=temperature, token_tv=tv,
                    backend=backend,
                )
            )  # fmt: skip

        return fn

    return Provider(f"{'pg_kernels' if tv else 'no_tv'}:{backend}", build)


def without_tv_summaries(device: torch.device, backends: tuple[str, ...]) -> list:
    """token_tv=False against the default in the same run: on a GPU its forward's reads (the
    target's two, TV's second read skipped), on a CPU the time of two exp passes."""
    if device.type == "cpu":
        shape, against = {"N": 1024, "V": 32000}, "ceiling:exp:logits+exp:rollout_logits"
        bound = Target("ms / ms(2 exp passes)", "fwd", against, time_ratio=True)
    else:
        shape, against = {"N": 16384, "V": 151936}, "ceiling:amax:logits+amax:rollout_logits"
        bound = Target("fwd / 2 reads ≤ 1.1", "fwd", against, at_most=1.1)
    where = "×".join(str(n) for n in shape.values())
    return [
        harness.targets_summary(
            f"token_tv=False ({b}) at {where}",
            f"no_tv:{b}",
            shape,
            [bound, Target("fwd / with token_tv", "fwd", f"pg_kernels:{b}", time_ratio=True)],
        )
        for b in backends
    ]


def _eager(case: Case, temperature: float):
    return lambda inputs: _fields(_ref_fn(*_args(inputs), temperature))


def _compile(case: Case, temperature: float):
    key = (OP, case.device.type, case.dtype, tuple(case.shape.items()), temperature)
    compiled = harness.compile_once(_ref_fn, key)
    return lambda inputs: _fields(compiled(*_args(inputs), temperature))


def make_bench(device: torch.device, temperature: float = 1.0) -> OpBench:
    backends = ("cpu",) if device.type == "cpu" else ("triton", "cuda")
    providers = [_pg_provider(b, temperature, tv) for b in backends for tv in (True, False)]
    providers += [
        Provider("eager", functools.partial(_eager, temperature=temperature)),
        Provider("compile", functools.partial(_compile, temperature=temperature)),
    ]
    ceilings = {
        "amax:logits": harness.amax_ceiling("logits"),
        "amax:rollout_logits": harness.amax_ceiling("rollout_logits"),
        "copy": harness.copy_ceiling(),
    }
    both = ("amax:logits", "amax:rollout_logits")
    rows: dict[str, list[CeilingRow]] = {
        "fwd": [CeilingRow(both)],
        "bwd": [CeilingRow(("amax:logits", "copy"))],
        # Both tensors read once, then the logits read and the gradient written: 3 reads +
        # 1 write, exactly the target's two reads + one copy.
        "fwd+bwd": [CeilingRow((*both, "copy"))],
    }
    if device.type == "cpu":
        ceilings["exp:logits"] = harness.exp_ceiling("logits")
        ceilings["exp:rollout_logits"] = harness.exp_ceiling("rollout_logits")
        exps = ("exp:logits", "exp:rollout_logits")
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
        check_fields=CHECK_FIELDS,
        check_rows=check_rows,
        tolerance_floor=tolerance_floor,
        providers=providers,
        ceilings=ceilings,
        ceiling_rows=rows,
        notes=["with rollout_logits: every MismatchStats field, token_kl and token_tv included"],
        summaries=bench_kl_divergence.targets(
            device, backends, other="rollout_logits", note=" (with rollout logits)"
        )
        + without_tv_summaries(device, backends),
        paired=tuple(
            (f"{name}:cpu", "ceiling:exp:logits+exp:rollout_logits")
            for name in ("pg_kernels", "no_tv")
        ),
    )


if __name__ == "__main__":
    sys.exit(harness.main(make_bench, default_shapes, DIMS, OP))
