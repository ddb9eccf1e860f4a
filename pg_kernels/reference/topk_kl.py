"""Reference top-k KL (SPEC section 4): KL(q || p) on the k ids plus one tail bucket."""

from __future__ import annotations

import torch

from pg_kernels.reference._util import compute_dtype, finish, invalid_rows, label_mask, scaled


def _xlogy_ratio(w: torch.Tensor, logw: torch.Tensor, logv: torch.Tensor) -> torch.Tensor:
    """w (log w - log v), 0 where w = 0."""
    zero = w == 0
    return torch.where(zero, torch.zeros_like(w), w) * (
        torch.where(zero, torch.zeros_like(logw), logw)
        - torch.where(zero, torch.zeros_like(logv), logv)
    )


def topk_kl(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    upcast: bool = True,
) -> torch.Tensor:
    """logits [..., V], topk_ids [..., K] (distinct per row), topk_logprobs [..., K] -> [...].

    KL_k = sum_K q_v (log q_v - log p_v) + q_tail (log q_tail - log p_tail), with
    q_tail = 1 - sum_K q_v (clamped at 0) and p_tail the mass of p off the k ids. A lower bound
    on KL(q || p); equal to it when k = V.
    """
    dtype = compute_dtype(logits.dtype, upcast)
    z = scaled(logits, temperature, dtype)
    lse = torch.logsumexp(z, -1, keepdim=True)
    ids = topk_ids.long()
    logp_k = z.gather(-1, ids) - lse
    logq_k = topk_logprobs.to(dtype)
    head = _xlogy_ratio(logq_k.exp(), logq_k, logp_k).sum(-1)
    # p's tail mass from the logits off the k ids (no 1 - sum cancellation).
    logp_tail = torch.logsumexp(z.scatter(-1, ids, float("-inf")), -1) - lse.squeeze(-1)
    q_tail = (1 - logq_k.exp().sum(-1)).clamp_min(0)
    tail = _xlogy_ratio(q_tail, q_tail.log(), logp_tail)
    keep, _ = label_mask(labels, ignore_index)
    return finish(head + tail, invalid_rows(z), keep)
