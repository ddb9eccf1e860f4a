"""Reference token_stats: docs/math.md §2 in plain PyTorch over a materialized [N, V] softmax."""

from __future__ import annotations

import torch

from pg_kernels.outputs import TokenStats
from pg_kernels.reference._util import (
    compute_dtype,
    finish,
    invalid_rows,
    label_mask,
    no_gradient,
    relative_to_max,
    scaled,
    without_ignored,
    zero_where_neginf,
)


def token_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    upcast: bool = True,
) -> TokenStats:
    """logits [..., V], labels [...] -> TokenStats of [...] tensors in float64 (upcast) or fp32.

    Differentiable by autograd through logprob, entropy, collision and lse.
    """
    keep, c = label_mask(labels, ignore_index)
    z = without_ignored(scaled(logits, temperature, compute_dtype(logits.dtype, upcast)), keep)
    invalid = invalid_rows(z)
    lse = torch.logsumexp(z, -1)
    neginf = torch.isneginf(z)
    if upcast:
        # The float64 truth relative to the row max: log p = d - log s1 with d = z - z_max and
        # log s1 = log1p(the rest), s1 - 1 kept (relative_to_max). z - L rounds L at ulp(L) / 2:
        # an fp32 row whose rest is 7.6e-15 at |z| ~ 197 (tau 16.7) had the truth log p_c = 0
        # where a 50-digit evaluation gives -7.598e-15 and the C++ kernel -7.550e-15.
        # H = log s1 - sum p d likewise: L - sum p z cancels |L| to a few ulp(L), and for float64
        # logits that form would be the truth itself: fp64 V = 2, L ~ 47, entropy -4.3e-14 where
        # a 50-digit evaluation gives 1.0752e-13 (2.2e-13 off at L ~ 65), where this form and
        # the kernels' log s1 - t / s1 are off by ~1e-16 (ulp(1) of s1).
        d, log_s1 = relative_to_max(z)
        logp = d - log_s1
        p = logp.exp()
        entropy = log_s1.squeeze(-1) - (p * zero_where_neginf(d, neginf)).sum(-1)
        # L = z_max + log s1 likewise: logsumexp's backward e^(z - L) cancels |L| to ulp(L),
        # all of it for a row of finfo(float32).min at tau 0.7 (|L| = 4.9e38, ulp 7.6e22: every
        # p_j came out 1 on a uniform row).
        z_max = z.gather(-1, z.argmax(-1, keepdim=True))
        lse = torch.where(invalid, lse, (z_max + log_s1).squeeze(-1))
    else:
        # H = L - sum p z, the form trainers use; -inf logits have p = 0 and add nothing.
        logp = z - lse.unsqueeze(-1)
        p = logp.exp()
        entropy = lse - (p * zero_where_neginf(z, neginf)).sum(-1)
    collision = (p * p).sum(-1)
    logprob = logp.gather(-1, c.unsqueeze(-1)).squeeze(-1)
    if upcast:
        # (1 - p_c)^2 + sum_{j != c} p_j^2 with neither term a difference: C - p_c^2 lost the
        # rest's p_j^2 to ulp(1) of C (an lgp of 1.16e-11, a row at p_c = 1 - 3.4e-6, was
        # 1.1e-15 off, where the kernels are within 1e-6 of the mpmath value).
        others = torch.ones_like(p, dtype=torch.bool).scatter(-1, c.unsqueeze(-1), False)
        rest2 = torch.where(others, p * p, 0.0).sum(-1)
        lgp = torch.expm1(logprob) ** 2 + rest2
    else:
        p_c = logprob.exp()
        lgp = ((1 - p_c) ** 2 + (collision - p_c**2)).clamp_min(0)
    argmax = torch.where(invalid, torch.full_like(c, -1), z.argmax(-1))
    return TokenStats(
        logprob=finish(logprob, invalid, keep),
        entropy=finish(entropy, invalid, keep),
        collision=finish(collision, invalid, keep),
        lgp=no_gradient(finish(lgp, invalid, keep)),
        lse=finish(lse, invalid, keep),
        max_prob=no_gradient(finish(p.amax(-1), invalid, keep)),
        argmax=torch.where(keep, argmax, torch.zeros_like(argmax)),
    )
