"""Reference safe-vocabulary log-prob (docs/math.md §6)."""

from __future__ import annotations

import math

import torch

from pg_kernels.outputs import PrunedLogprob
from pg_kernels.reference._util import (
    compute_dtype,
    finish,
    invalid_rows,
    label_mask,
    no_gradient,
    scaled,
    without_ignored,
)


def pruned_logprob(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    upcast: bool = True,
) -> PrunedLogprob:
    """S = {v: z_v >= max z + log alpha} plus the label; logprob = z_c - logsumexp_S z."""
    if not (0 < alpha < 1):
        raise ValueError(f"pruned_logprob: alpha must be in (0, 1), got {alpha}")
    keep, c = label_mask(labels, ignore_index)
    z = without_ignored(scaled(logits, temperature, compute_dtype(logits.dtype, upcast)), keep)
    invalid = invalid_rows(z)
    top = z.amax(-1, keepdim=True).detach()
    # SPEC's S, in z units as SPEC writes it and C++ decides it (Triton tests d = z - max z
    # against log alpha: the two differ only for an entry within rounding of the threshold).
    safe = z >= top + math.log(alpha)
    # The truth's values relative to the row max (every result is shift-invariant, and the max
    # is a constant for the gradient): a row masked whole with -1e30 has z ~ -1e30 / tau, where
    # an fp64 ulp is ~1e14, and z_c - lse_safe lost every O(1) term (a logprob of 0 for
    # log(1/V)). Plain fp32 (upcast=False) stays the plain formula, z_c - logsumexp_S z, whose
    # error is the rule's yardstick.
    if z.dtype == torch.float64:
        z = z - torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    z_c = z.gather(-1, c.unsqueeze(-1))
    in_safe = safe.gather(-1, c.unsqueeze(-1)).squeeze(-1)
    safe = safe.scatter(-1, c.unsqueeze(-1), True)
    lse_safe = torch.logsumexp(z.masked_fill(~safe, float("-inf")), -1)
    lse = torch.logsumexp(z, -1)
    logprob = z_c.squeeze(-1) - lse_safe
    # The excluded tokens' probability summed directly: -expm1(lse_safe - lse) rounds a tail
    # below ulp(lse) to exactly 0 (fuzzer: 2.9e-29 in the kernel read as an error there).
    tail_mass = torch.exp(torch.logsumexp(z.masked_fill(safe, float("-inf")), -1) - lse)
    return PrunedLogprob(
        logprob=finish(logprob, invalid, keep),
        in_safe=in_safe & keep & ~invalid,
        tail_mass=no_gradient(finish(tail_mass, invalid, keep)),
    )
