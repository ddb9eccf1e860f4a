"""Sampled KL estimators k1 / k2 / k3 with gradients (docs/math.md §5), optionally clamped.

`ops.mismatch_stats` gives the same estimators as no-grad diagnostics; this is the
differentiable form a KL loss or a KL-shaped reward uses, in either direction.
"""

from __future__ import annotations

import torch

from pg_kernels.algorithms._common import (
    check_choice,
    check_same_device,
    check_shape,
    compute_dtype,
)

KINDS = ("k1", "k2", "k3")
# verl's numerical guards on its k3 ("low_var_kl"): the log-ratio is clamped to +-20 before
# exp, the estimate to +-10 after (verl.trainer.ppo.core_algos.kl_penalty_forward, 0.9.1).
VERL_LOG_RATIO_CLAMP = 20.0
VERL_K3_CLAMP = 10.0


def sampled_kl(
    sample_logprob: torch.Tensor,
    other_logprob: torch.Tensor,
    kind: str = "k3",
    *,
    clamp: bool = False,
) -> torch.Tensor:
    """Per-token estimate of KL(q_s || q_o) from tokens sampled from q_s (Schulman's k1-k3).

    With s = sample_logprob - other_logprob = log q_s(c) - log q_o(c) and c ~ q_s:

        k1 = s              (unbiased, can be negative)
        k2 = s^2 / 2        (biased, >= 0; its gradient is the reverse-KL gradient)
        k3 = e^{-s} - 1 + s (unbiased, >= 0), computed with expm1

    docs/math.md §5's k1 / k3 for the training-vs-rollout mismatch are
    `sampled_kl(rollout_logprob, logprob, ...)` (tokens drawn from the rollout policy);
    a KL penalty against a reference policy on tokens drawn from the training policy is
    `sampled_kl(logprob, ref_logprob, ...)`, verl's `kl_penalty(logprob, ref_logprob, ...)`.

    Args:
        sample_logprob: [...] float, log-probs under the distribution the tokens came from.
        other_logprob: [...] float, same shape, log-probs under the other distribution.
        kind: "k1", "k2" or "k3".
        clamp: verl's guards, k3 only: s clamped to [-20, 20] before exp and the estimate to
            [-10, 10] (its gradient is 0 where a clamp is active). Off by default: the exact
            estimate, whose k3 overflows to inf for s < -88 in float32.

    Returns:
        [...] tensor in the promoted dtype of the inputs, at least float32 (bf16 in: float32,
        where k3's expm1(-s) rounded to bf16 before + s lost its digits), differentiable in
        both (gradients reach each input in its own dtype).
    """
    check_choice("kind", kind, KINDS)
    for name, t in (("sample_logprob", sample_logprob), ("other_logprob", other_logprob)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor")
    check_shape("other_logprob", other_logprob, sample_logprob.shape)
    check_same_device(sample_logprob=sample_logprob, other_logprob=other_logprob)
    dtype = compute_dtype(sample_logprob, other_logprob)
    s = sample_logprob.to(dtype) - other_logprob.to(dtype)
    if kind == "k1":
        return s
    if kind == "k2":
        return 0.5 * s * s
    if clamp:
        s = s.clamp(-VERL_LOG_RATIO_CLAMP, VERL_LOG_RATIO_CLAMP)
    # e^{-s} - 1 + s: expm1 keeps the digits of a small s (k3 ~ s^2 / 2).
    k3 = torch.expm1(-s) + s
    if clamp:
        k3 = k3.clamp(-VERL_K3_CLAMP, VERL_K3_CLAMP)
    return k3
