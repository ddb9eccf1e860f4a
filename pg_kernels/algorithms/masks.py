"""Sequence masks: which rows of a batch may enter the loss (docs/math.md §7).

Both return `bool [B]` (True = keep) for `policy_loss(..., seq_mask=...)`, whose normalisers keep
counting the rejected rows. Vectorized row reductions; no host sync; fullgraph-compilable.
The divergences are compared in the compute dtype (`_common.compute_dtype`: float32 for bf16 /
fp16 / fp32 inputs, float64 for float64): in bf16, exp(mean log-ratio) rounds to exactly 1 for
any mean in about [-0.0019, 0.0039], and a threshold such as 0.05 is itself rounded.
"""

from __future__ import annotations

import torch

from pg_kernels.algorithms._common import (
    check_band,
    check_float,
    check_mask,
    check_number,
    check_same_device,
    check_shape,
    compute_dtype,
    masked_amax,
    masked_row_mean,
    valid,
)


def trm_mask(
    mask: torch.Tensor,
    *,
    token_kl: torch.Tensor | None = None,
    k2: torch.Tensor | None = None,
    k3: torch.Tensor | None = None,
    max_threshold: float = 0.05,
    avg_threshold: float = 0.001,
) -> torch.Tensor:
    """Trust Region Masking: keep a row only if its token divergence stays in the trust region.

    Exact mode (`token_kl`, the per-token KL(pi_roll || pi_theta) from
    `mismatch_stats(..., rollout_logits=..., token_tv=False)`: the mask needs no TV, which on a
    GPU costs a second read of both tensors): D_max = D_avg = token_kl. Sampled mode (no
    rollout logits): D_max = k2 = delta^2 / 2 and D_avg = k3 = rho - 1 - delta. Over row i's valid
    tokens V_i:

        keep_i = [max_{t in V_i} D_max,t <= max_threshold]
                 and [mean_{t in V_i} D_avg,t <= avg_threshold]

    A NaN on any valid token rejects the row; a row with no valid token is kept (nothing to
    violate). Values on masked tokens are ignored, NaN included. bf16 / fp16 divergences are
    compared in float32.

    Args:
        mask: [B, T] bool, int or float (nonzero = a valid token).
        token_kl: [B, T] float, exact mode. Give either token_kl or both k2 and k3.
        k2, k3: [B, T] float, sampled mode.
        max_threshold, avg_threshold: the trust-region radii (the paper's defaults).

    Returns:
        bool [B], True = keep.
    """
    check_mask("mask", mask, getattr(mask, "shape", ()))
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-d [B, T], got shape {tuple(mask.shape)}")
    exact = token_kl is not None
    if exact == (k2 is not None or k3 is not None) or (not exact and (k2 is None or k3 is None)):
        raise ValueError("give either token_kl (exact mode) or both k2 and k3 (sampled mode)")
    for name, t in (("token_kl", token_kl), ("k2", k2), ("k3", k3)):
        if t is not None:
            check_float(name, t, 2)
            check_shape(name, t, mask.shape)
    check_same_device(mask=mask, token_kl=token_kl, k2=k2, k3=k3)
    check_number("max_threshold", max_threshold, at_least=0.0)
    check_number("avg_threshold", avg_threshold, at_least=0.0)
    d_max, d_avg = (token_kl, token_kl) if exact else (k2, k3)
    d_max, d_avg = d_max.to(compute_dtype(d_max)), d_avg.to(compute_dtype(d_avg))
    ok = valid(mask)
    nan_row = ((torch.isnan(d_max) | torch.isnan(d_avg)) & ok).any(1)
    row_max = masked_amax(d_max, ok, dim=1)
    row_mean = masked_row_mean(d_avg, ok.to(d_avg.dtype))
    return (row_max <= max_threshold) & (row_mean <= avg_threshold) & ~nan_row


def geometric_rejection(
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    *,
    low: float = 0.999,
    high: float = 1.001,
    veto: float = 1e-4,
    clamp: float = 20.0,
) -> torch.Tensor:
    """Geometric-mean rejection with a per-token veto (multi-turn mismatch correction).

    With delta_t = log_ratio_t (train - rollout log-prob) over row i's valid tokens V_i:

        keep_i = [low <= exp(clamp(mean_{t in V_i} delta_t, -clamp, clamp)) <= high]
                 and [no t in V_i has exp(clamp(delta_t, -clamp, clamp)) < veto]

    The mean is taken of the raw deltas and clamped after: clamping each token first moved the
    mean (one delta of +45 among 25000 of ~1e-3 noise: exp(mean) 1.0018 computed as 1.0008, kept).

    A row with no valid token has mean 0 (ratio 1) and is kept when low <= 1 <= high. A NaN on a
    valid token rejects the row. A bf16 / fp16 log_ratio is averaged and exponentiated in float32.

    Args:
        log_ratio: [B, T] float.
        mask: [B, T] bool, int or float.
        low, high: the band for the geometric-mean ratio.
        veto: a token ratio below this rejects its row.
        clamp: |log_ratio| bound before exp (as verl's SAFETY_BOUND).

    Returns:
        bool [B], True = keep.
    """
    check_float("log_ratio", log_ratio, 2)
    check_mask("mask", mask, log_ratio.shape)
    check_same_device(log_ratio=log_ratio, mask=mask)
    check_band("low", low, "high", high)
    check_number("veto", veto, at_least=0.0)
    check_number("clamp", clamp, above=0.0)
    ok = valid(mask)
    delta = log_ratio.to(compute_dtype(log_ratio))
    geo = torch.exp(masked_row_mean(delta, ok.to(delta.dtype)).clamp(-clamp, clamp))
    nan_row = (torch.isnan(log_ratio) & ok).any(1)
    vetoed = ((torch.exp(delta.clamp(-clamp, clamp)) < veto) & ok).any(1)
    return (geo >= low) & (geo <= high) & ~vetoed & ~nan_row
