"""Reference training-step bundle (docs/math.md §9): the single ops' references on one copy."""

from __future__ import annotations

import torch

from pg_kernels.outputs import StepStats
from pg_kernels.reference._util import compute_dtype
from pg_kernels.reference.kl_divergence import kl_divergence
from pg_kernels.reference.mismatch_stats import mismatch_stats
from pg_kernels.reference.token_stats import token_stats


def step_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    rollout_logprobs: torch.Tensor | None = None,
    rollout_logits: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    kl_direction: str = "reverse",
    temperature: float | torch.Tensor = 1.0,
    rollout_temperature: float | torch.Tensor | None = None,
    ref_temperature: float | torch.Tensor | None = None,
    ignore_index: int = -100,
    tis_cap: float = 2.0,
    icepop_low: float = 0.5,
    icepop_high: float = 2.0,
    token_tv: bool = True,
    upcast: bool = True,
) -> StepStats:
    """StepStats from token_stats, mismatch_stats and kl_divergence's references.

    The logits are converted to the working precision once, up front: each reference converting
    a 16-bit leaf itself would make its gradient the sum of the ops' gradients each rounded to 16
    bits (terms of ~0.1 that cancel to ~0.004 then carry ulp(0.1) = 5e-4 of error).
    """
    work = compute_dtype(logits.dtype, upcast)
    x = logits.to(work)
    shared = dict(temperature=temperature, ignore_index=ignore_index, upcast=upcast)
    token = token_stats(x, labels, **shared)
    mismatch = kl = None
    if rollout_logprobs is not None:
        rt = temperature if rollout_temperature is None else rollout_temperature
        mismatch = mismatch_stats(
            x, labels, rollout_logprobs, rollout_logits=rollout_logits, rollout_temperature=rt,
            tis_cap=tis_cap, icepop_low=icepop_low, icepop_high=icepop_high, token_tv=token_tv,
            **shared,
        )  # fmt: skip
    if ref_logits is not None:
        kl = kl_divergence(
            x, ref_logits.to(work), direction=kl_direction, ref_temperature=ref_temperature,
            labels=labels, **shared,
        )  # fmt: skip
    return StepStats(token=token, mismatch=mismatch, kl=kl)
