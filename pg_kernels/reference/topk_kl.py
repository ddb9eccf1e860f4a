"""Reference top-k KL (docs/math.md §4): KL(q || p) on the k ids plus one tail bucket."""

from __future__ import annotations

import torch

from pg_kernels.reference._util import (
    compute_dtype,
    finish,
    invalid_rows,
    label_mask,
    relative_to_max,
    scaled,
    without_ignored,
)


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
    q_tail = 1 - sum_K q_v (clamped at 0; exactly 0 when k = V, where there is no tail bucket)
    and p_tail the mass of p off the k ids. A lower bound on KL(q || p); equal to it when k = V.
    A positive q_v (or q_tail) against p_v = 0 (p_tail = 0) gives +inf. Differentiable in
    `logits` by autograd (d/dz_j = Q p_j - q_v on the ids, p_j (Q - q_tail / p_tail) off
    them, Q = sum_K q_v + q_tail), not in topk_logprobs.
    """
    dtype = compute_dtype(logits.dtype, upcast)
    keep, _ = label_mask(labels, ignore_index)
    z = without_ignored(scaled(logits, temperature, dtype), keep)
    # log p = base - lse. The truth's are relative to the row max with the normalizer's
    # s1 - 1 kept (z - L rounds L at ulp(L) / 2: at |z| ~ 1800 a head log-prob of -1.1e-13
    # came out 0 and a KL of 1.1e-13 as -7e-17); plain PyTorch (upcast=False) takes
    # z - logsumexp(z).
    if upcast:
        base, lse = relative_to_max(z)
    else:
        base, lse = z, torch.logsumexp(z, -1, keepdim=True)
    ids = topk_ids.long()
    if keep is not None:  # ignored rows may hold padding ids: read distinct in-range ones instead
        spare = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
        ids = torch.where(keep.unsqueeze(-1), ids, spare)
    logp_k = base.gather(-1, ids) - lse
    logq_k = topk_logprobs.to(dtype)
    q_k = logq_k.exp()
    head = _xlogy_ratio(q_k, logq_k, logp_k).sum(-1)
    # p's tail mass from the entries off the k ids (no 1 - sum cancellation). A tail with no
    # finite logit (k = V, or only -inf left) has log mass -inf; the double `where` keeps
    # logsumexp's backward off that all -inf row (it would give 0 * nan).
    z_tail = base.scatter(-1, ids, float("-inf"))
    tail_empty = torch.isneginf(z_tail).all(-1)
    # Relative to the tail's own max (a constant to autograd): logsumexp's backward e^(z - lse)
    # with lse rounded at ulp(z) read 1 per entry for a tail at -1e16 (each entry's p_j / P_tail
    # is 1/3 for three tied ones).
    z_tail = torch.where(tail_empty.unsqueeze(-1), 0.0, z_tail)
    top_tail = z_tail.detach().amax(-1, keepdim=True)
    lse_tail = (top_tail + torch.logsumexp(z_tail - top_tail, -1, keepdim=True)).squeeze(-1)
    logp_tail = torch.where(tail_empty, float("-inf"), lse_tail) - lse.squeeze(-1)
    if upcast:
        # An empty tail's log P_tail = -inf keeps the gradient of -L = -(z_i + lse), the
        # limit convention of the kernels (Q p_j - q_j on the ids); lse alone lacks z_i's.
        z_i = z.gather(-1, z.argmax(-1, keepdim=True)).squeeze(-1)
        logp_tail = logp_tail - torch.where(tail_empty, z_i - z_i.detach(), 0.0)
    # k = V: there is no tail bucket, so q_tail = 0 exactly (1 - sum q_v is rounding noise that
    # would otherwise meet p_tail = 0 and give +inf).
    # The truth takes 1 - sum q_v as -expm1(log q_max) - the other q's: 1 - (a sum near 1)
    # rounds at ulp(1) / 2 = 1.1e-16 even in float64, and log q_tail - log P_tail reaches ~1e3
    # at a small temperature (fp64 [1, 1282] at tau 0.135: a q_tail of 6.4e-17 (60-digit
    # mpmath) came out 0, and a KL of 3.7e-5 6.0e-14 off). Plain PyTorch takes 1 - sum q_v,
    # and so does the truth against an empty tail, where only whether q_tail > 0 matters (the
    # KL is +inf or not): there 1 - sum q_v at most 2 K eps of the op's accumulation dtype is
    # the log-probs' own rounding and leaves no tail bucket (an engine's top-k covering the
    # policy's whole support), as in the kernels (softmax_stats.h, topk_tail_noise).
    rest = 1 - q_k.sum(-1)
    if upcast:
        i = logq_k.argmax(-1, keepdim=True)
        exact = -torch.expm1(logq_k.gather(-1, i)).squeeze(-1) - q_k.scatter(-1, i, 0.0).sum(-1)
        rest = torch.where(tail_empty, rest, exact)
    acc = compute_dtype(logits.dtype, upcast=False)  # the kernels' accumulation dtype
    noise = 2 * ids.shape[-1] * torch.finfo(acc).eps
    rest = torch.where(tail_empty & (rest <= noise), 0.0, rest)
    q_tail = rest.clamp_min(0)
    if ids.shape[-1] >= z.shape[-1]:
        q_tail = torch.zeros_like(q_tail)
    tail = _xlogy_ratio(q_tail, q_tail.log(), logp_tail)
    return finish(head + tail, invalid_rows(z), keep)
