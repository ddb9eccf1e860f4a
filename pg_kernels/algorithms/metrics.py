"""Training-vs-rollout health metrics (docs/math.md §§5 and 7)."""

from __future__ import annotations

import torch

from pg_kernels.algorithms._common import (
    check_float,
    check_mask,
    check_same_device,
    check_shape,
    compute_dtype,
    masked_amax,
    masked_row_mean,
    valid,
)

LOG_RATIO_BOUND = 20.0


@torch.no_grad()
def mismatch_metrics(
    logprob: torch.Tensor,
    rollout_logprob: torch.Tensor,
    mask: torch.Tensor,
    *,
    token_kl: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Batch summaries of the training-vs-rollout mismatch, as detached 0-d tensors (no sync).

    With delta = logprob - rollout_logprob, rho = exp(clamp(delta, -20, 20)), the token means
    taken over all valid tokens of the batch, and the row means over each row's valid tokens
    (rows without a valid token are left out of the row averages):

    | key                | value                                           | verl name        |
    |--------------------|-------------------------------------------------|------------------|
    | kl                 | token mean of k1 = -delta (KL(roll||train) est.)| kl               |
    | k2_kl              | token mean of k2 = delta^2 / 2                  | (none)           |
    | k3_kl              | token mean of k3 = rho - 1 - delta              | k3_kl            |
    | chi2_token         | token mean of rho^2, minus 1                    | chi2_token       |
    | chi2_seq           | row mean of exp(2 clamp(sum_t delta, +-20)), -1 | chi2_seq         |
    | log_ppl_diff       | row mean of (mean_t l_roll - mean_t l)          | log_ppl_diff     |
    | log_ppl_abs_diff   | row mean of |mean_t l - mean_t l_roll| (PPL gap) | log_ppl_abs_diff |
    | training_ppl       | row mean of exp(-mean_t l)                      | training_ppl     |
    | rollout_ppl        | row mean of exp(-mean_t l_roll)                 | rollout_ppl      |
    | abs_log_ratio_mean | token mean of |delta|                           | (none)           |
    | abs_log_ratio_max  | token max of |delta|                            | (none)           |
    | chi2_mean          | token mean of (rho - 1)^2 (docs/math.md §5)     | (none)           |
    | token_kl_mean      | token mean of exact KL(pi_roll||pi_theta)       | (none)           |
    | token_kl_max       | token max of exact KL (both with token_kl)      | (none)           |

    verl logs these under the `rollout_corr/` prefix (its `compute_offpolicy_metrics`, from
    the training log-probs vs the rollout log-probs); its chi2_token is E[rho^2] - 1, which is
    not docs/math.md §5's E[(rho - 1)^2] (here `chi2_mean`). verl averages rows without a
    valid token as 0 where this function leaves them out.

    Args:
        logprob: [B, T] float, training log-probs of the sampled tokens.
        rollout_logprob: [B, T] float, the rollout engine's log-probs of the same tokens.
        mask: [B, T] bool, int or float (nonzero = valid).
        token_kl: optional [B, T] float, exact per-token KL(pi_roll || pi_theta)
            (`mismatch_stats(..., rollout_logits=..., token_tv=False).token_kl`; token_tv=False
            spares the TV this function does not use).

    Returns:
        dict of 0-d tensors in the inputs' promoted float dtype, at least float32 (bf16 in:
        float32, where k3's rho - 1 - delta would cancel; float64 in: float64); NaN means when
        no token is valid.
    """
    check_float("logprob", logprob, 2)
    check_float("rollout_logprob", rollout_logprob, 2)
    check_shape("rollout_logprob", rollout_logprob, logprob.shape)
    check_mask("mask", mask, logprob.shape)
    if token_kl is not None:
        check_float("token_kl", token_kl, 2)
        check_shape("token_kl", token_kl, logprob.shape)
    check_same_device(
        logprob=logprob, rollout_logprob=rollout_logprob, mask=mask, token_kl=token_kl
    )
    dtype = compute_dtype(logprob, rollout_logprob, token_kl)
    ok = valid(mask)
    okf = ok.to(dtype)
    lp = torch.where(ok, logprob.to(dtype), 0)
    lr = torch.where(ok, rollout_logprob.to(dtype), 0)
    delta = lp - lr
    rho = torch.exp(delta.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    n_tok = okf.sum()

    def tmean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(ok, x, 0).sum() / n_tok

    def tmax(x: torch.Tensor) -> torch.Tensor:  # NaN without a valid token, as tmean
        return torch.where(n_tok > 0, masked_amax(x, ok), torch.nan)

    has = ok.any(1)
    n_rows = has.to(dtype).sum()

    def rmean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(has, x, 0).sum() / n_rows

    mean_lp = masked_row_mean(lp, okf)
    mean_lr = masked_row_mean(lr, okf)
    seq_log = (delta * okf).sum(1).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    out = {
        "kl": tmean(-delta),
        "k2_kl": tmean(0.5 * delta * delta),
        "k3_kl": tmean(rho - 1 - delta),
        "chi2_token": tmean(rho * rho) - 1,
        "chi2_seq": rmean(torch.exp(2 * seq_log)) - 1,
        "log_ppl_diff": rmean(mean_lr - mean_lp),
        "log_ppl_abs_diff": rmean((mean_lp - mean_lr).abs()),
        "training_ppl": rmean(torch.exp(-mean_lp)),
        "rollout_ppl": rmean(torch.exp(-mean_lr)),
        "abs_log_ratio_mean": tmean(delta.abs()),
        "abs_log_ratio_max": tmax(delta.abs()),
        "chi2_mean": tmean((rho - 1) ** 2),
    }
    if token_kl is not None:
        kl = token_kl.to(dtype)
        out["token_kl_mean"] = tmean(kl)
        out["token_kl_max"] = tmax(kl)
    return out
