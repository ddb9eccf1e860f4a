"""Reference divergences between two logit tensors (docs/math.md §4).

A term with zero weight (a -inf logit) contributes exactly 0, even against -inf log-probs of the
other side; a positive weight (a finite logit, however small its probability) against a zero
probability of the other side gives +inf.
"""

from __future__ import annotations

import torch

from pg_kernels.reference._util import (
    compute_dtype,
    finish,
    invalid_rows,
    label_mask,
    log_softmax_keeping_rest,
    scaled,
    scaled_from_max,
    without_ignored,
)

DIRECTIONS = ("reverse", "forward")


def _kl(logw: torch.Tensor, logv: torch.Tensor) -> torch.Tensor:
    """sum_j w_j (log w_j - log v_j) over the last dim: 0 where w_j = 0, +inf where
    w_j > 0 = v_j (a token only w's side can produce).

    Which terms those are is read off the logits (log w_j = -inf: a -inf logit), not off w_j's
    value: a finite logit has w_j > 0 however far its float value underflows (log w_j < -745
    in float64), so against v_j = 0 the KL is +inf at every precision and temperature.
    """
    w_zero, v_zero = torch.isneginf(logw), torch.isneginf(logv)
    either = w_zero | v_zero
    zero = torch.zeros_like(logw)
    diff = torch.where(either, zero, logw) - torch.where(either, zero, logv)
    terms = torch.where(v_zero & ~w_zero, torch.full_like(logw, float("inf")), logw.exp() * diff)
    return terms.sum(-1)


def kl_divergence(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    direction: str = "reverse",
    temperature: float | torch.Tensor = 1.0,
    ref_temperature: float | torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    upcast: bool = True,
) -> torch.Tensor:
    """Per-row KL [...] between p = softmax(logits/T) and q = softmax(ref_logits/T_ref).

    direction "reverse": KL(p || q); "forward": KL(q || p). Differentiable by autograd.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"kl_divergence: direction must be one of {DIRECTIONS}, got {direction!r}")
    dtype = compute_dtype(logits.dtype, upcast)
    # The truth shifts each side by its max before the division (`scaled_from_max`) and keeps
    # each normalizer's s1 - 1; plain PyTorch (upcast=False) is log_softmax of x / T.
    scale = scaled_from_max if upcast else scaled
    keep, _ = label_mask(labels, ignore_index)
    z = without_ignored(scale(logits, temperature, dtype), keep)
    t_ref = temperature if ref_temperature is None else ref_temperature
    zr = without_ignored(scale(ref_logits, t_ref, dtype), keep)
    if upcast:
        logp, logq = log_softmax_keeping_rest(z), log_softmax_keeping_rest(zr)
    else:
        logp, logq = z.log_softmax(-1), zr.log_softmax(-1)
    kl = _kl(logp, logq) if direction == "reverse" else _kl(logq, logp)
    return finish(kl, invalid_rows(z) | invalid_rows(zr), keep)


def rollout_tv(
    logits: torch.Tensor,
    rollout_logits: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    rollout_temperature: float | torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    upcast: bool = True,
) -> torch.Tensor:
    """Total variation 1/2 sum |p - q| per row [...]."""
    dtype = compute_dtype(logits.dtype, upcast)
    scale = scaled_from_max if upcast else scaled  # as kl_divergence
    keep, _ = label_mask(labels, ignore_index)
    z = without_ignored(scale(logits, temperature, dtype), keep)
    t_roll = temperature if rollout_temperature is None else rollout_temperature
    zr = without_ignored(scale(rollout_logits, t_roll, dtype), keep)
    if upcast:
        # |p_j - q_j| = max(p_j, q_j) |expm1(-|log p_j - log q_j|)|, the logs keeping each
        # normalizer's s1 - 1: p_j - q_j rounds both top entries of near one-hot rows to 1 in
        # float64 (rests below 1.1e-16 lost), and that entry, half the TV, read 0 (fp32 rows
        # whose rests are ~1e-25: a TV of 1.13e-26 for 2.25e-26).
        lp, lq = log_softmax_keeping_rest(z), log_softmax_keeping_rest(zr)
        hi = torch.maximum(lp, lq)
        gap = torch.where(torch.isneginf(hi), 0.0, (lp - lq).abs())  # both -inf: no term
        tv = 0.5 * (hi.exp() * -torch.expm1(-gap)).sum(-1)
    else:
        tv = 0.5 * (z.softmax(-1) - zr.softmax(-1)).abs().sum(-1)
    return finish(tv, invalid_rows(z) | invalid_rows(zr), keep)
