"""Reference divergences between two logit tensors (docs/math.md §4).

A term with zero weight (a -inf logit) contributes exactly 0, even against -inf log-probs of the
other side; a positive weight (a finite logit, however small its probability) against a zero
probability of the other side gives +inf.
"""

from __future__ import annotations

import math

import torch

from pg_kernels.reference._util import (
    compute_dtype,
    finish,
    finite_row_max,
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


# |delta_j| below which phi(delta) = e^delta - 1 - delta is summed as its series (through
# delta^8 / 8!: the first term left out is below 1e-19 of delta^2 / 2), and the bound on every
# centred log-ratio of a row that takes the near-equal form (`_kl_near`).
SERIES_BELOW = 1e-2
NEAR_BELOW = 1.0


def _phi_times(w: torch.Tensor, logw: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """w (e^delta - 1 - delta) without cancelling: the series for small |delta| (expm1(delta) -
    delta rounds at ulp(delta), 2e-13 of it at delta 1e-3), w e^delta as e^(log w + delta) for
    delta > 1 (w may underflow where e^delta does not). Each branch sees only its own deltas,
    so that autograd's zeros for the other never meet an overflow (0 * inf)."""
    small = delta.abs() < SERIES_BELOW
    t = torch.where(small, delta, torch.zeros_like(delta))
    series = torch.zeros_like(t)
    for n in range(8, 1, -1):  # Horner: t^2 (1/2! + t (1/3! + ... + t / 8!))
        series = (series + 1.0 / math.factorial(n)) * (t if n > 2 else t * t)
    big = torch.where(small, torch.zeros_like(delta), delta)
    direct = torch.where(
        big > 1.0, torch.exp(logw + big) - w * (1.0 + big), w * (torch.expm1(big) - big)
    )
    return torch.where(small, w * series, direct)


def _kl_near(zw: torch.Tensor, zv: torch.Tensor, logw: torch.Tensor, d: torch.Tensor):
    """(KL, near) per row from the scaled logits of both sides (w's and v's, -inf masked) and
    log w: where every log-ratio of w's support lies within NEAR_BELOW of its w-mean c, KL =
    k + u - (s - log1p s), docs/math.md §4's form centred on c so that no two large terms
    cancel: delta_j = (zv_j - zw_j) - c, k = sum w phi(delta), u = v's mass off w's support
    relative to w's, s = k + u + sum w delta (the last ~0, c's rounding). sum w_j (log w_j -
    log v_j) from rounded logs carries ~ulp(|log p|) per term: -3.9e-17 for a KL of 1.4e-19.
    `near` is False elsewhere (a KL that is not small, whose direct sum is accurate). d: the
    log-ratios zv - zw, formed from the raw logits where the sides share a temperature (each z
    rounded on its own carried ~ulp(z) into a delta of 1e-9: 2.8e-7 of the KL)."""
    w_zero, v_zero = torch.isneginf(zw), torch.isneginf(zv)
    both = ~w_zero & ~v_zero
    w = torch.where(w_zero, torch.zeros_like(logw), logw.exp())
    d = torch.where(both, d, torch.zeros_like(zw))
    c = (w * d).sum(-1, keepdim=True)
    delta = torch.where(both, d - c, torch.zeros_like(d))
    near = ((delta.abs() < NEAR_BELOW) | ~both).all(-1) & torch.isfinite(c[..., 0])
    delta = torch.where(near[..., None], delta, torch.zeros_like(delta))
    k = _phi_times(w, torch.where(w_zero, torch.zeros_like(logw), logw), delta).sum(-1)
    # u = sum over w_j = 0 < v_j of e^{zv_j} / (e^c sum_j e^{zw_j}); 0 where there is none
    off = w_zero & ~v_zero
    has_off = off.any(-1, keepdim=True)
    lse_off = torch.where(has_off, torch.where(off, zv, -torch.inf), torch.zeros_like(zv))
    log_u = lse_off.logsumexp(-1) - c[..., 0] - zw.logsumexp(-1)
    safe = has_off[..., 0] & near
    u = torch.where(safe, torch.where(safe, log_u, torch.zeros_like(log_u)).exp(), 0.0)
    s = k + u + (w * delta).sum(-1)
    return k + u - (s - torch.log1p(s)), near


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
    if upcast:
        zw, zv, logw = (z, zr, logp) if direction == "reverse" else (zr, z, logq)
        d = zv - zw
        if ref_temperature is None or ref_temperature is temperature:
            # zr - z = ((xr - x) - (mr - m)) / T: differences of the raw logits, exact where
            # they are near (each side's shift m is scaled_from_max's, a constant)
            x, xr = logits.to(dtype), ref_logits.to(dtype)
            raw = (xr - x) - (finite_row_max(xr) - finite_row_max(x))
            d = scaled(raw if direction == "reverse" else -raw, temperature, dtype)
        near_kl, near = _kl_near(zw, zv, logw, d)
        # (rows with a +inf term, a finite w logit against a -inf v, keep the direct +inf)
        kl = torch.where(near & torch.isfinite(kl), near_kl, kl)
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
