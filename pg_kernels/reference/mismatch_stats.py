"""Reference training-vs-rollout mismatch (docs/math.md §§4 and 5)."""

from __future__ import annotations

import math

import torch

from pg_kernels.outputs import MismatchStats
from pg_kernels.reference._util import compute_dtype, label_mask
from pg_kernels.reference.kl_divergence import kl_divergence, rollout_tv
from pg_kernels.reference.token_stats import token_stats

RATIO_CLAMP = 20.0  # rho = exp(clamp(delta, -20, 20)): no overflow on wild tokens


def _excess(delta: torch.Tensor) -> torch.Tensor:
    """e^delta - 1 - delta without cancelling: its series where |delta| <= 1/4 (to delta^18,
    below 1e-20 of the sum), else expm1(delta) - delta."""
    small = delta.abs() <= 0.25
    d = torch.where(small, delta, 0.0)  # each branch on values it cannot overflow on: the
    big = torch.where(small, 1.0, delta).clamp(-RATIO_CLAMP, RATIO_CLAMP)  # other's backward
    series = torch.zeros_like(delta)  # would give 0 * inf (a delta of 1e30: NaN gradients)
    for n in range(18, 1, -1):
        series = (series + 1 / math.factorial(n)) * (d if n > 2 else d * d)
    return torch.where(small, series, torch.expm1(big) - big)


def sampled_mismatch(
    logprob: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    *,
    tis_cap: float = 2.0,
    icepop_low: float = 0.5,
    icepop_high: float = 2.0,
    exact: bool = False,
) -> dict[str, torch.Tensor]:
    """The sampled-token estimators of docs/math.md §5 from per-token log-probs.

    exact=False takes k3 = rho - 1 - delta and chi2 = (rho - 1)^2 as trainers do; exact=True
    (the float64 truth) without cancelling: rho - 1 of a delta of 1e-23 is 0 in float64, and
    rho - 1 - delta of a delta of 1e-9 keeps only 1e-7 of k3 ~ 5e-19 (a truth of -6.1e-18)."""
    delta = logprob - rollout_logprobs.to(logprob.dtype)
    clamped = delta.clamp(-RATIO_CLAMP, RATIO_CLAMP)
    rho = clamped.exp()
    rho_m1 = torch.expm1(clamped) if exact else rho - 1
    k3 = torch.where(delta.abs() <= RATIO_CLAMP, _excess(delta), rho_m1 - delta) if exact \
        else rho - 1 - delta
    # A NaN ratio stays NaN (NaN rows are NaN in every field); out of the band is 0.
    in_band = ((rho >= icepop_low) & (rho <= icepop_high)) | rho.isnan()
    return {
        "log_ratio": delta,
        "ratio": rho,
        "k1": -delta,
        "k2": 0.5 * delta * delta,
        "k3": k3,
        "abs_log_ratio": delta.abs(),
        "chi2": rho_m1**2,
        "tis_weight": rho.clamp_max(tis_cap),
        "icepop_weight": torch.where(in_band, rho, torch.zeros_like(rho)),
    }


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
    upcast: bool = True,
) -> MismatchStats:
    """logits [..., V], labels [...], rollout_logprobs [...], optional rollout_logits [..., V];
    token_tv=False leaves the TV out (None), as the op's switch."""
    stats = token_stats(
        logits, labels, temperature=temperature, ignore_index=ignore_index, upcast=upcast
    )
    keep, _ = label_mask(labels, ignore_index)
    dtype = compute_dtype(logits.dtype, upcast)
    sampled = sampled_mismatch(
        stats.logprob,
        rollout_logprobs.to(dtype),
        tis_cap=tis_cap,
        icepop_low=icepop_low,
        icepop_high=icepop_high,
        exact=upcast,
    )
    sampled = {k: torch.where(keep, v, torch.zeros_like(v)) for k, v in sampled.items()}
    token_kl = tv = None
    if rollout_logits is not None:
        shared = dict(
            temperature=temperature,
            labels=labels,
            ignore_index=ignore_index,
            upcast=upcast,
        )
        rt = temperature if rollout_temperature is None else rollout_temperature
        # KL(pi_roll || pi_theta) is the forward direction with q the rollout distribution.
        token_kl = kl_divergence(
            logits, rollout_logits, direction="forward", ref_temperature=rt, **shared
        )
        if token_tv:
            tv = rollout_tv(logits, rollout_logits, rollout_temperature=rt, **shared)
    return MismatchStats(logprob=stats.logprob, **sampled, token_kl=token_kl, token_tv=tv)
