"""The sampled-token estimators of mismatch_stats and step_stats (docs/math.md §5): elementwise
functions of each token's log-prob under the training policy and under the rollout engine.

Layers: `sampled_estimators` (used by the two public ops, not exported) -> op
`pg_kernels::sampled_estimators` (schema in _library.py) -> one kernel over the N tokens: C++
(`pg_kernels._C`) on CPU tensors, Triton on CUDA tensors. Each writes the nine fields, every
one computed in double and rounded once to the log-prob's dtype (plain fp32 PyTorch's k3 of a
small delta is rho - 1 - delta's cancellation: 12 % off where the kernels are 6e-8). The
"reference" backend (and a GPU without Triton) takes the same formulas as PyTorch ops, ~22
elementwise calls: ~49 us of host time at any small batch on the 2-core AMD EPYC VM (the kernel
call: ~5 us) and 22 launches on a GPU, where at small batches launches are the op's time.
"""

from __future__ import annotations

import torch

from pg_kernels import _backend, _library
from pg_kernels.ops._common import check_float_arg

OP = "sampled_estimators"
KERNELS = _backend.INTERNAL_KERNELS[OP]
RATIO_CLAMP = 20.0  # rho = exp(clamp(delta, -20, 20)): no overflow on wild tokens
_ROLLOUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SAMPLED_FIELDS = (  # the kernels' outputs, in this order
    "log_ratio", "ratio", "k1", "k2", "k3", "abs_log_ratio", "chi2", "tis_weight",
    "icepop_weight",
)  # fmt: skip


def check_rollout_logprobs(op, logits, labels, rollout_logprobs) -> None:
    """The sampled estimators' tensor input, shared by mismatch_stats and step_stats (their
    constants: `estimator_constants`)."""
    if not isinstance(rollout_logprobs, torch.Tensor) or not rollout_logprobs.is_floating_point():
        raise TypeError(f"{op}: rollout_logprobs must be a floating tensor of log-probs")
    if tuple(rollout_logprobs.shape) != tuple(labels.shape):
        raise ValueError(
            f"{op}: rollout_logprobs must have the labels' shape {tuple(labels.shape)}, "
            f"got {tuple(rollout_logprobs.shape)}"
        )
    if rollout_logprobs.device != logits.device:
        raise ValueError(
            f"{op}: rollout_logprobs is on {rollout_logprobs.device} but logits on {logits.device}"
        )


def estimator_constants(op, tis_cap, icepop_low, icepop_high) -> dict[str, float]:
    """tis_cap, icepop_low and icepop_high checked, as floats (`sampled_estimators`' kwargs)."""
    tis_cap = check_float_arg(op, "tis_cap", tis_cap, low=0.0)
    icepop_low = check_float_arg(op, "icepop_low", icepop_low)
    icepop_high = check_float_arg(op, "icepop_high", icepop_high)
    if not 0 <= icepop_low <= icepop_high:
        raise ValueError(
            f"{op}: need 0 <= icepop_low <= icepop_high, got {icepop_low} and {icepop_high}"
        )
    return {"tis_cap": tis_cap, "icepop_low": icepop_low, "icepop_high": icepop_high}


def _sampled_estimators(
    logprob, rollout_logprobs, labels, ignore_index, tis_cap, icepop_low, icepop_high, backend
):
    forward, _ = _backend.launchers(OP, backend)
    return forward(
        logprob, rollout_logprobs, labels, ignore_index, tis_cap, icepop_low, icepop_high
    )


_library.register_kernel(OP)(_sampled_estimators)


@torch.library.register_fake("pg_kernels::sampled_estimators")
def _sampled_estimators_fake(
    logprob, rollout_logprobs, labels, ignore_index, tis_cap, icepop_low, icepop_high, backend
):
    return [logprob.new_empty(labels.shape) for _ in SAMPLED_FIELDS]


def _as_ops(logprob, rollout_logprobs, keep, *, tis_cap, icepop_low, icepop_high):
    """The same fields as PyTorch ops, in the log-prob's dtype (the "reference" backend)."""
    # delta is 0 on rows not kept, where every field but the ratio's is then 0 too.
    delta = torch.where(keep, logprob - rollout_logprobs.to(logprob.dtype), 0.0)
    clamped = delta.clamp(-RATIO_CLAMP, RATIO_CLAMP)
    rho_m1 = clamped.expm1()  # k3, chi2: rho - 1 in float32 would lose a small delta's digits
    rho = torch.where(keep, clamped.exp(), 0.0)
    abs_delta = delta.abs()
    return {
        "log_ratio": delta,
        "ratio": rho,
        "k1": 0.0 - delta,  # not -delta: -0.0 on the rows not kept
        "k2": 0.5 * delta * delta,
        # e^delta - 1 - delta >= 0 exactly: clamp the last rounding; past the ratio clamp,
        # e^20 - 1 - delta as SPEC's formula gives it (negative beyond delta = e^20 - 1).
        "k3": torch.where(
            abs_delta <= RATIO_CLAMP, (rho_m1 - delta).clamp_min(0), rho_m1 - delta
        ),
        "abs_log_ratio": abs_delta,
        "chi2": rho_m1 * rho_m1,
        "tis_weight": rho.clamp_max(tis_cap),
        # 0 outside the band; NaN stays NaN (a NaN row is NaN in every field).
        "icepop_weight": torch.where((rho < icepop_low) | (rho > icepop_high), 0.0, rho),
    }


def sampled_estimators(
    logprob: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    *,
    tis_cap: float,
    icepop_low: float,
    icepop_high: float,
    backend: str,
) -> dict[str, torch.Tensor]:
    """docs/math.md §5 from [...] log-probs, 0 where labels == ignore_index: the fields of
    SAMPLED_FIELDS, no grad. `backend`: the calling op's; "reference" takes PyTorch ops, any
    other the kernel for the tensors' device ("auto")."""
    logprob, rollout_logprobs = logprob.detach(), rollout_logprobs.detach()
    if rollout_logprobs.dtype not in _ROLLOUT_DTYPES:  # float8: the kernels read 16 bits up
        rollout_logprobs = rollout_logprobs.to(logprob.dtype)
    if backend != "reference":
        backend = _backend.resolve(OP, "auto", logprob.device, kernels=KERNELS)
    if backend == "reference":
        return _as_ops(logprob, rollout_logprobs, labels != ignore_index, tis_cap=tis_cap,
                       icepop_low=icepop_low, icepop_high=icepop_high)  # fmt: skip
    out = _library.call(OP,
        logprob, rollout_logprobs, labels, ignore_index, tis_cap, icepop_low, icepop_high,
        backend,
    )  # fmt: skip
    return dict(zip(SAMPLED_FIELDS, out))
