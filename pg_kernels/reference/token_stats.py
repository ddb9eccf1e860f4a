"""Reference token_stats: docs/math.md §2 in plain PyTorch over a materialized [N, V] softmax."""

from __future__ import annotations

import torch

from pg_kernels.outputs import TokenStats
from pg_kernels.reference._util import (
    compute_dtype,
    finish,
    invalid_rows,
    label_mask,
    scaled,
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
    z = scaled(logits, temperature, compute_dtype(logits.dtype, upcast))
    keep, c = label_mask(labels, ignore_index)
    invalid = invalid_rows(z)
    lse = torch.logsumexp(z, -1)
    logp = z - lse.unsqueeze(-1)
    p = logp.exp()
    neginf = torch.isneginf(z)
    if upcast:
        # The float64 truth relative to the row max m: H = log s1 - sum p (z - m), p from z - m.
        # L - sum p z cancels |L| to a few ulp(L), and for float64 logits that form would be the
        # truth itself: fp64 V = 2, L ~ 47, entropy -4.3e-14 where a 50-digit evaluation gives
        # 1.0752e-13 (2.2e-13 off at L ~ 65), where this form and the kernels' log s1 - t / s1
        # are off by ~1e-16 (ulp(1) of s1).
        m = z.detach().amax(-1, keepdim=True)
        d = z - torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        log_s1 = torch.logsumexp(d, -1, keepdim=True)
        p_d = ((d - log_s1).exp() * zero_where_neginf(d, neginf)).sum(-1)
        entropy = log_s1.squeeze(-1) - p_d
    else:
        # H = L - sum p z, the form trainers use; -inf logits have p = 0 and add nothing.
        entropy = lse - (p * zero_where_neginf(z, neginf)).sum(-1)
    collision = (p * p).sum(-1)
    logprob = logp.gather(-1, c.unsqueeze(-1)).squeeze(-1)
    p_c = logprob.exp()
    lgp = ((1 - p_c) ** 2 + (collision - p_c**2)).clamp_min(0)
    argmax = torch.where(invalid, torch.full_like(c, -1), z.argmax(-1))
    return TokenStats(
        logprob=finish(logprob, invalid, keep),
        entropy=finish(entropy, invalid, keep),
        collision=finish(collision, invalid, keep),
        lgp=finish(lgp, invalid, keep).detach(),
        lse=finish(lse, invalid, keep),
        max_prob=finish(p.amax(-1), invalid, keep).detach(),
        argmax=torch.where(keep, argmax, torch.zeros_like(argmax)),
    )
