"""mismatch_stats: training-vs-rollout mismatch per token (docs/math.md §§4 and 5).

Two parts:
  * Row reductions over the logits: the label's log-prob log pi_theta(c) (differentiable) and,
    when the rollout engine's logits are given, the exact KL(pi_roll || pi_theta) and total
    variation 1/2 sum |pi_theta - pi_roll|. Without rollout logits this is the token_stats op
    (one pass). With them it is the op `pg_kernels::mismatch_stats`: one pass over the logits
    and one over the rollout logits, read together chunk by chunk. TV needs both normalizers,
    known only at the row's end: the C++ kernel then sweeps the exps that pass kept in a
    per-thread scratch (still in cache; no exp and no re-read of the logits, see
    csrc/cpu/divergence.cpp); the Triton kernel, whose chunk programs cannot hold a row, reads
    both rows a second time (pg_kernels/triton/mismatch_stats.py). Its backward (of logprob
    only) is one pass from the saved per-row max and log-normalizer of the logits. (It does not
    reuse token_stats_backward: that recomputes p_j = e^{z_j - L} and loses ulp(L), ~1e-5 at
    L ~ 200 on peaked rows at low temperature, 1.5e-5 relative on p_c ~ 1 in a test.)
  * The sampled-token estimators (log ratio, ratio, k1, k2, k3, |delta|, chi2, TIS and IcePop
    weights): elementwise on [...] tensors, computed here from logprob.detach().

Gradients: only `logprob` is differentiable (w.r.t. logits). The estimators, token_kl and
token_tv are no-grad diagnostics (trust-region masks, rollout-correction weights, health
metrics). For a differentiable exact KL use `kl_divergence(..., direction="forward")`; for a
loss on an estimator, write it on `logprob` (e.g. exp(logprob - rollout_logprobs)).
"""

from __future__ import annotations

import torch

from pg_kernels import _backend, _library, reference
from pg_kernels.ops._common import (
    acc_dtype,
    check_flag,
    check_ignore_index,
    check_labels_arg,
    check_labels_on_cpu,
    check_logits,
    check_logits_pair,
    make_temperature,
    row_layout,
    view_rows,
)
from pg_kernels.ops.sampled_estimators import (
    check_rollout_logprobs,
    estimator_constants,
    sampled_estimators,
)
from pg_kernels.ops.token_stats import token_stats
from pg_kernels.outputs import MismatchStats

OP = "mismatch_stats"
KERNELS = _backend.KERNELS[OP]  # backends with a fused kernel for the rollout-logits case


def _flat(labels):
    # contiguous(): reshape(-1) of a strided 1-D view (labels[::2]) is still strided.
    return labels.reshape(-1).contiguous()


@_library.register_kernel("mismatch_stats")
def _mismatch_stats(
    logits, rollout_logits, labels, temperature, temperature_scalar, rollout_temperature,
    rollout_temperature_scalar, ignore_index, backend, tv=True,
):  # fmt: skip
    check_logits_pair(OP, logits, rollout_logits, "rollout_logits")  # direct torch.ops calls too
    forward, _ = _backend.launchers(OP, backend)
    logprob, token_kl, token_tv, row_state = forward(
        logits, rollout_logits, _flat(labels), temperature, temperature_scalar,
        rollout_temperature, rollout_temperature_scalar, ignore_index, tv,
        *row_layout(OP, "logits", logits), *row_layout(OP, "rollout_logits", rollout_logits),
    )  # fmt: skip
    token_tv = token_tv.view_as(labels) if tv else token_tv  # [0] without TV
    rows = (o.view_as(labels) for o in (logprob, token_kl))
    return (*rows, token_tv, view_rows(row_state, labels.shape, 2))


@torch.library.register_fake("pg_kernels::mismatch_stats")
def _mismatch_stats_fake(
    logits, rollout_logits, labels, temperature, temperature_scalar, rollout_temperature,
    rollout_temperature_scalar, ignore_index, backend, tv=True,
):  # fmt: skip
    out = labels.new_empty(labels.shape, dtype=acc_dtype(logits.dtype))
    row_state = labels.new_empty((*labels.shape, 2), dtype=acc_dtype(logits.dtype))
    token_tv = torch.empty_like(out) if tv else out.new_empty((0,))
    return out, torch.empty_like(out), token_tv, row_state


@_library.register_kernel("mismatch_stats_backward")
def _mismatch_stats_backward(
    grad_logprob, logits, labels, temperature, temperature_scalar, ignore_index, row_state,
    backend,
):  # fmt: skip
    _, backward = _backend.launchers(OP, backend)
    acc = acc_dtype(logits.dtype)
    return backward(
        grad_logprob.reshape(-1).to(acc).contiguous(), logits, _flat(labels), temperature,
        temperature_scalar, ignore_index, row_state.reshape(-1).to(acc).contiguous(),
        *row_layout(OP, "logits", logits),
    )  # fmt: skip


@torch.library.register_fake("pg_kernels::mismatch_stats_backward")
def _mismatch_stats_backward_fake(
    grad_logprob, logits, labels, temperature, temperature_scalar, ignore_index, row_state,
    backend,
):  # fmt: skip
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    (logits, rollout_logits, labels, temperature, temperature_scalar, rollout_temperature,
     rollout_temperature_scalar, ignore_index, backend, _) = inputs  # fmt: skip
    _, token_kl, token_tv, row_state = output
    ctx.save_for_backward(logits, labels, temperature, row_state)
    ctx.scalars = (temperature_scalar, ignore_index, backend)
    ctx.mark_non_differentiable(token_kl, token_tv, row_state)


def _backward(ctx, g_logprob, g_kl, g_tv, g_row_state):
    logits, labels, temperature, row_state = ctx.saved_tensors
    temperature_scalar, ignore_index, backend = ctx.scalars
    grad = None
    if ctx.needs_input_grad[0]:
        # d logprob / dz_j = 1[j = c] - p_j
        grad = _library.call("mismatch_stats_backward",
            g_logprob, logits, labels, temperature, temperature_scalar, ignore_index, row_state,
            backend,
        )  # fmt: skip
    return grad, *(None,) * 9


torch.library.register_autograd(
    "pg_kernels::mismatch_stats", _backward, setup_context=_setup_context
)
_library.differentiable_once("mismatch_stats_backward")


def mismatch_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    *,
    rollout_logits: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    rollout_temperature: float | torch.Tensor | None = None,
    ignore_index: int = -100,
    tis_cap: float = 2.0,
    icepop_low: float = 0.5,
    icepop_high: float = 2.0,
    token_tv: bool = True,
    backend: str = "auto",
) -> MismatchStats:
    """Training-vs-rollout mismatch per token: sampled estimators, and exact KL / TV.

    Args:
        logits: [..., V] training logits, bf16, fp16, fp32 or fp64; last dim contiguous.
        labels: [...] int64/int32, the sampled tokens; ignore_index rows give 0 everywhere.
        rollout_logprobs: [...] float, log pi_roll(c) as the rollout engine reported it.
        rollout_logits: optional [..., V] rollout-engine logits, same shape and dtype as
            `logits`; enables the exact token_kl and token_tv.
        temperature: float or [...] tensor for the training logits.
        rollout_temperature: the same for rollout_logits (default: `temperature`); used only
            with rollout_logits (rollout_logprobs are taken as given).
        ignore_index: label value of rows to skip.
        tis_cap: truncated-IS cap C, > 0: tis_weight = min(rho, C).
        icepop_low, icepop_high: IcePop band, 0 <= low <= high: rho * 1[low <= rho <= high].
        token_tv: False skips the total variation (token_tv is then None): TV needs both
            normalizers first, so a GPU reads both tensors a second time for it (the forward
            then takes ~1.8x two reads, against ~1x without), and a CPU sweeps the exps it
            kept. token_kl and every other field are the same bits either way.
        backend: "auto", "reference", "cpu", "triton"; without rollout_logits also what
            token_stats takes.

    Returns:
        MismatchStats of [...] tensors, fp32 (fp64 for fp64 logits), with
        delta = logprob - rollout_logprobs and rho = exp(clamp(delta, -20, 20)):
        logprob (differentiable w.r.t. logits), log_ratio, ratio, k1 = -delta,
        k2 = delta^2 / 2, k3 = rho - 1 - delta, abs_log_ratio, chi2 = (rho - 1)^2, tis_weight,
        icepop_weight; token_kl = KL(pi_roll || pi_theta) and token_tv = 1/2 sum |p - q| when
        rollout_logits is given (token_tv only with token_tv=True), else None.
        E_{c ~ pi_roll}[k3] = token_kl.
        Every field but logprob is a no-grad diagnostic. A NaN in rollout_logprobs makes that
        row's estimators NaN; a NaN / +inf / all -inf row of rollout_logits makes that row's
        token_kl and token_tv NaN (logprob is unaffected). token_kl is +inf where the rollout
        sampled from a token the training policy gives probability 0.
    """
    check_logits(OP, "logits", logits)
    check_labels_arg(OP, logits, labels)
    ignore_index = check_ignore_index(OP, ignore_index, labels)
    check_rollout_logprobs(OP, logits, labels, rollout_logprobs)
    bands = estimator_constants(OP, tis_cap, icepop_low, icepop_high)
    temp = make_temperature(OP, temperature, logits)
    roll_temp = (  # checked here whether or not rollout_logits use it
        temp
        if rollout_temperature is None
        else make_temperature(OP, rollout_temperature, logits, "rollout_temperature")
    )
    check_labels_on_cpu(OP, labels, logits.shape[-1], ignore_index)  # errors name this op
    tv = check_flag(OP, "token_tv", token_tv)
    token_kl = token_tv = None
    if rollout_logits is None:  # token_stats' kernel; errors name this op
        kernels = _backend.KERNELS["token_stats"]
        backend = _backend.resolve(OP, backend, logits.device, kernels=kernels)
        logprob = token_stats(
            logits, labels, temperature=temperature, ignore_index=ignore_index, backend=backend
        ).logprob
    else:
        check_logits_pair(OP, logits, rollout_logits, "rollout_logits")
        backend = _backend.resolve(OP, backend, logits.device, kernels=KERNELS)
        if backend == "reference":
            rt = temperature if rollout_temperature is None else rollout_temperature
            shared = dict(
                temperature=temperature, labels=labels, ignore_index=ignore_index, upcast=False
            )
            logprob = reference.token_stats(
                logits, labels, temperature=temperature, ignore_index=ignore_index, upcast=False
            ).logprob
            token_kl = reference.kl_divergence(
                logits, rollout_logits, direction="forward", ref_temperature=rt, **shared
            ).detach()
            if tv:
                token_tv = reference.rollout_tv(
                    logits, rollout_logits, rollout_temperature=rt, **shared
                ).detach()
        else:
            logprob, token_kl, token_tv, _ = _library.call("mismatch_stats",
                logits, rollout_logits, labels, temp.tensor, temp.scalar, roll_temp.tensor,
                roll_temp.scalar, ignore_index, backend, tv,
            )  # fmt: skip
            token_tv = token_tv if tv else None
    sampled = sampled_estimators(
        logprob, rollout_logprobs, labels, ignore_index, **bands, backend=backend
    )
    return MismatchStats(logprob=logprob, **sampled, token_kl=token_kl, token_tv=token_tv)
