"""Policy-gradient losses on per-token log-probs (docs/math.md §7).

Token losses are aggregated over `[B, T]` with a mask; a sequence mask (TRM, geometric
rejection) zeroes whole rows while every normaliser still counts them. Everything is
differentiable w.r.t. `logprob`, free of host syncs and fullgraph-compilable; `metrics` are
detached 0-d tensors (call `.item()` yourself when logging). Everything is computed in, and
returned in, the compute dtype (`_common.compute_dtype`: float32 for bf16 / fp16 / fp32 inputs,
float64 for float64); gradients reach the inputs in their own dtype.
"""

from __future__ import annotations

import torch

from pg_kernels.algorithms._common import (
    check_band,
    check_choice,
    check_float,
    check_mask,
    check_number,
    check_same_device,
    check_shape,
    compute_dtype,
    masked_amax,
    masked_amin,
    valid,
    weights,
)

LOSS_TYPES = ("ppo", "gspo", "cispo")
AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
ROLLOUT_CORRECTIONS = (None, "tis", "icepop")
LOG_RATIO_BOUND = 20.0  # |log ratio| bound before exp, as verl's SAFETY_BOUND


def _aggregate(
    loss: torch.Tensor, w: torch.Tensor, norm_w: torch.Tensor, agg: str, norm_length: int | None
) -> torch.Tensor:
    """Aggregate token values `loss` [B, T] with weights `w` (the seq mask applied) and
    normaliser weights `norm_w` (the seq mask not applied: rejected rows still count). An empty
    batch (B = 0 or T = 0) aggregates to 0."""
    B, T = loss.shape
    lw = torch.where(w != 0, loss, 0) * w  # a NaN / inf on a masked token stays out
    if agg == "token-mean":
        den = norm_w.sum()
        return lw.sum() / torch.where(den != 0, den, 1)
    if agg == "seq-mean-token-sum":
        return lw.sum(1).sum() / max(B, 1)
    if agg == "seq-mean-token-mean":
        den = norm_w.sum(1)
        return (lw.sum(1) / torch.where(den != 0, den, 1)).sum() / max(B, 1)
    # seq-mean-token-sum-norm (Dr. GRPO): a constant normaliser, B x the generation budget
    return lw.sum() / max(B * (T if norm_length is None else norm_length), 1)


def _check_norm_length(norm_length) -> None:
    if norm_length is not None and (
        isinstance(norm_length, bool) or not isinstance(norm_length, int) or norm_length < 1
    ):
        raise ValueError(f"norm_length must be a positive int or None, got {norm_length!r}")


def _as_token_adv(advantages: torch.Tensor, shape: torch.Size, name: str) -> torch.Tensor:
    check_float(name, advantages, (1, 2))
    B, T = shape
    check_shape(name, advantages, (B,) if advantages.dim() == 1 else (B, T))
    return advantages[:, None].expand(B, T) if advantages.dim() == 1 else advantages


def policy_loss(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "ppo",
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    norm_length: int | None = None,
    seq_mask: torch.Tensor | None = None,
    rollout_logprob: torch.Tensor | None = None,
    rollout_correction: str | None = None,
    tis_cap: float = 2.0,
    icepop_low: float = 0.5,
    icepop_high: float = 2.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss (PPO / GRPO / DAPO / Dr. GRPO / GSPO / CISPO) with
    aggregation, sequence masking and rollout correction.

    Per token, with l = logprob, l_old = old_logprob, A the advantage and
    clip(x) = clamp(x, 1 - clip_low, 1 + clip_high):

        ppo    r_t = exp(l_t - l_old_t)
               L_t = max(-A r_t, -A clip(r_t))
               dual_clip = c (> 1): where A < 0, L_t = min(L_t, -c A)
        gspo   s_i = exp(mean_{t valid} (l_t - l_old_t))      (sequence ratio; the mean clamped)
               r_t = sg(s_i) exp(l_t - sg(l_t))       (value s_i, gradient s_i dl_t: GSPO-token)
               then L_t as ppo (dual clip included)
        cispo  L_t = -sg(clip(r_t)) A l_t          (r_t as ppo; the clipped IS weight is detached)

    Log ratios (gspo: the sequence mean) are clamped to +-20 before exp. Rollout correction
    multiplies L_t by a detached weight from rho_t = exp(clamp(old_logprob - rollout_logprob,
    +-20)): tis: min(rho_t, tis_cap); icepop: rho_t if icepop_low <= rho_t <= icepop_high else 0.
    `seq_mask` zeroes the tokens of rejected rows (no gradient reaches them, whatever NaN their
    values hold); the normalisers below keep counting them. With m the mask (a float mask acts
    as token weights) and m' = m * 1[seq_mask != 0]:

        token-mean               sum L m' / sum m
        seq-mean-token-sum       (1/B) sum_i sum_t L m'
        seq-mean-token-mean      (1/B) sum_i (sum_t L m' / sum_t m)   (a row with sum_t m = 0: 0)
        seq-mean-token-sum-norm  sum L m' / (B T'),  T' = norm_length or mask.shape[1]  (Dr. GRPO)

    The papers' choices: GRPO seq-mean-token-mean, DAPO token-mean, Dr. GRPO
    seq-mean-token-sum-norm with norm_length the generation budget (a constant across batches;
    mask.shape[1] varies when batches are padded to their own longest row), GSPO
    seq-mean-token-mean (s_i is a sequence quantity; token-mean weighs rows by length).
    An empty batch (B = 0 or T = 0) gives loss 0.

    loss = agg(L) - entropy_coef agg(entropy) + kl_coef agg(kl), each with the same m', m
    (rollout-correction weights apply to L only).

    Args:
        logprob: [B, T] float, log pi_theta of the sampled tokens (differentiable).
        old_logprob: [B, T] float, log-probs of the policy that the ratio is taken against
            (a constant: taken detached, as are advantages and rollout_logprob).
        advantages: [B] (one per row) or [B, T] float.
        mask: [B, T] bool, int or float.
        loss_type: "ppo", "gspo" or "cispo".
        clip_low, clip_high: the clip range (asymmetric, DAPO's clip-higher by default).
        dual_clip: None or c > 1 (ppo and gspo).
        agg: one of the four aggregations above.
        norm_length: seq-mean-token-sum-norm's T' (default mask.shape[1]), a positive int.
        seq_mask: optional [B] bool, int or float, True / nonzero = keep the row (a flag, not
            a weight).
        rollout_logprob: [B, T] float, needed with rollout_correction.
        rollout_correction: None, "tis" or "icepop".
        tis_cap, icepop_low, icepop_high: the correction's constants.
        entropy, kl: optional [B, T] float per-token terms (differentiable), with their coefs.

    Returns:
        (loss, metrics): loss a 0-d tensor in the inputs' promoted float dtype, at least
        float32 (bf16 in: float32; float64 in: float64); metrics a dict of detached 0-d
        tensors over the valid tokens of `mask`: clip_fraction (tokens whose clipped branch is
        active: ppo/gspo where the clipped term is the larger, cispo where r_t is outside the
        range), dual_clip_fraction, ppo_kl = mean(l_old - l), ratio_mean / ratio_min /
        ratio_max (r_t; s_i for gspo), kept_fraction (mean of seq_mask; 1 without it).
    """
    check_float("logprob", logprob, 2)
    shape = logprob.shape
    check_float("old_logprob", old_logprob, 2)
    check_shape("old_logprob", old_logprob, shape)
    adv = _as_token_adv(advantages, shape, "advantages")
    check_mask("mask", mask, shape)
    check_choice("loss_type", loss_type, LOSS_TYPES)
    check_choice("agg", agg, AGGREGATIONS)
    _check_norm_length(norm_length)
    check_choice("rollout_correction", rollout_correction, ROLLOUT_CORRECTIONS)
    check_number("clip_low", clip_low, at_least=0.0)
    check_number("clip_high", clip_high, at_least=0.0)
    check_number("tis_cap", tis_cap, above=0.0)
    check_band("icepop_low", icepop_low, "icepop_high", icepop_high)
    if dual_clip is not None:
        if loss_type == "cispo":
            raise ValueError("dual_clip applies to loss_type 'ppo' and 'gspo', not 'cispo'")
        check_number("dual_clip", dual_clip, above=1.0)
    check_number("entropy_coef", entropy_coef)
    check_number("kl_coef", kl_coef)
    if seq_mask is not None:
        check_mask("seq_mask", seq_mask, (shape[0],))
    if rollout_correction is not None:
        if rollout_logprob is None:
            raise ValueError(f"rollout_correction={rollout_correction!r} needs rollout_logprob")
    if rollout_logprob is not None:
        check_float("rollout_logprob", rollout_logprob, 2)
        check_shape("rollout_logprob", rollout_logprob, shape)
    for name, t, coef in (("entropy", entropy, entropy_coef), ("kl", kl, kl_coef)):
        if t is None and coef != 0.0:
            raise ValueError(f"{name}_coef={coef} needs {name}")
        if t is not None:
            check_float(name, t, 2)
            check_shape(name, t, shape)
    check_same_device(
        logprob=logprob, old_logprob=old_logprob, advantages=advantages, mask=mask,
        seq_mask=seq_mask, rollout_logprob=rollout_logprob, entropy=entropy, kl=kl,
    )  # fmt: skip

    # fp16 overflowed exp(12) to inf (0 * inf: a NaN loss at A = 0), bf16 rounded the ratio.
    dtype = compute_dtype(logprob, old_logprob, advantages, rollout_logprob, entropy, kl)
    ok = valid(mask)
    m = weights(mask, dtype)
    w = m if seq_mask is None else m * weights(valid(seq_mask), dtype)[:, None]
    # Advantages and the old log-probs are constants of the loss: no gradient flows back through
    # them (an advantage built from a differentiable statistic, or old_logprob passed without
    # .detach(), would bend the policy gradient). A masked token's values stay out of every
    # gradient too: its NaN advantage or -inf log-prob times a zero upstream gradient is NaN.
    adv = torch.where(ok, adv.to(dtype), 0).detach()
    old = old_logprob.detach().to(dtype)
    lp = torch.where(ok, logprob.to(dtype), 0)
    # A rejected row's tokens take no gradient, cut here where it enters (torch.where passes 0,
    # not 0 times a NaN): a NaN correction weight or advantage of theirs times the zero upstream
    # gradient would be NaN. The values, and so the metrics, are unchanged.
    lp = torch.where(w != 0, lp, lp.detach())
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    raw_log_ratio = torch.where(ok, lp - old, 0)
    log_ratio = raw_log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)

    dual_active = torch.zeros_like(ok)
    if loss_type == "cispo":
        ratio = torch.exp(log_ratio)
        token_loss = _score_term(-ratio.clamp(lo, hi).detach() * adv, lp)
        clipped = (ratio < lo) | (ratio > hi)
        ratio_stat = ratio
    else:
        if loss_type == "gspo":
            n = m.sum(1, keepdim=True)
            seq_log = (raw_log_ratio * m).sum(1, keepdim=True) / torch.where(n != 0, n, 1)
            seq_log = seq_log.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
            # lp - sg(lp) is 0 with the gradient of lp; at a -inf log-prob (-inf - -inf: NaN)
            # it is 0 and takes no gradient, as ppo's clamped log ratio gives that token none.
            st = torch.where(lp > -torch.inf, lp - lp.detach(), 0)
            ratio = torch.exp(seq_log.detach() + st)
            ratio_stat = torch.exp(seq_log).expand(shape)
        else:
            ratio = torch.exp(log_ratio)
            ratio_stat = ratio
        unclipped = -adv * ratio
        clipped_term = -adv * ratio.clamp(lo, hi)
        token_loss = torch.maximum(unclipped, clipped_term)
        clipped = clipped_term > unclipped
        if dual_clip is not None:
            cap = -dual_clip * adv
            dual_active = (adv < 0) & (token_loss > cap)
            token_loss = torch.where(adv < 0, torch.minimum(token_loss, cap), token_loss)

    if rollout_correction is not None:
        delta = (old - rollout_logprob.detach().to(dtype)).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        rho = torch.exp(delta).detach()
        if rollout_correction == "tis":
            corr = rho.clamp(max=tis_cap)
        else:
            corr = torch.where((rho >= icepop_low) & (rho <= icepop_high), rho, 0)
        token_loss = token_loss * corr

    loss = _aggregate(token_loss, w, m, agg, norm_length)
    if entropy is not None:
        loss = loss - entropy_coef * _aggregate(entropy.to(dtype), w, m, agg, norm_length)
    if kl is not None:
        loss = loss + kl_coef * _aggregate(kl.to(dtype), w, m, agg, norm_length)

    with torch.no_grad():
        okf = ok.to(dtype)
        n_tok = okf.sum().clamp(min=1)
        metrics = {
            "clip_fraction": (clipped & ok).to(dtype).sum() / n_tok,
            "dual_clip_fraction": (dual_active & ok).to(dtype).sum() / n_tok,
            "ppo_kl": torch.where(ok, -log_ratio, 0).sum() / n_tok,
            "ratio_mean": torch.where(ok, ratio_stat, 0).sum() / n_tok,
            "ratio_min": masked_amin(ratio_stat, ok),
            "ratio_max": masked_amax(ratio_stat, ok),
            "kept_fraction": (
                torch.ones((), dtype=dtype, device=logprob.device)
                if seq_mask is None
                else weights(valid(seq_mask), dtype).mean()
            ),
        }
    return loss, metrics


def hybrid_il_rl_loss(
    logprob: torch.Tensor,
    advantages: torch.Tensor,
    token_kl: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    agg: str = "token-mean",
    norm_length: int | None = None,
) -> torch.Tensor:
    """Hybrid imitation + RL loss: the dense reverse-KL gradient plus the sparse score term.

    The objective is E_{y ~ pi}[R - beta sum_t KL_t] with KL_t = KL(pi_theta || pi_teacher) at
    the prefix of token t (`kl_divergence(logits, teacher_logits)`, reverse direction).
    Its gradient has two parts: the dense one, beta grad KL_t at each visited prefix, and the
    score-function one, through the tokens that lead to later prefixes. Per token:

        A'_t = A - beta sum_{t' > t} KL_t' m_t'        (suffix sum, detached)
        L_t  = -A'_t l_t + beta KL_t

    aggregated with `agg` (as policy_loss). Keeping only the dense term is biased; both are kept.

    Args:
        logprob: [B, T] float, log pi_theta of the sampled tokens (differentiable).
        advantages: [B] or [B, T] float, the task advantage A.
        token_kl: [B, T] float, per-token reverse KL to the teacher (differentiable).
        mask: [B, T] bool, int or float.
        beta: the KL weight.
        agg: "token-mean", "seq-mean-token-sum", "seq-mean-token-mean" or
            "seq-mean-token-sum-norm".
        norm_length: as policy_loss.

    Returns:
        0-d loss in the inputs' promoted float dtype, at least float32.
    """
    check_float("logprob", logprob, 2)
    shape = logprob.shape
    adv = _as_token_adv(advantages, shape, "advantages")
    check_float("token_kl", token_kl, 2)
    check_shape("token_kl", token_kl, shape)
    check_mask("mask", mask, shape)
    check_number("beta", beta)
    check_choice("agg", agg, AGGREGATIONS)
    _check_norm_length(norm_length)
    check_same_device(logprob=logprob, advantages=advantages, token_kl=token_kl, mask=mask)
    dtype = compute_dtype(logprob, advantages, token_kl)
    ok = valid(mask)
    m = weights(mask, dtype)
    kl = torch.where(ok, token_kl.to(dtype), 0)
    km = (kl * m).detach()
    # sum over t' > t: the reverse cumsum from t + 1 (the inclusive one minus km_t cancelled
    # where a large KL_t sits beside small later ones, and read inf - inf at an infinite KL_t).
    suffix = km.flip(1).cumsum(1).flip(1)
    suffix_after = torch.cat([suffix[:, 1:], torch.zeros_like(suffix[:, :1])], 1)
    # Masked tokens' advantages and log-probs stay out of the gradient (as in policy_loss).
    shaped = torch.where(ok, adv.to(dtype) - beta * suffix_after, 0).detach()
    token_loss = _score_term(-shaped, torch.where(ok, logprob.to(dtype), 0)) + beta * kl
    return _aggregate(token_loss, m, m, agg, norm_length)


def _score_term(coef: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """coef * lp with a detached coef, 0 where coef is 0: a -inf log-prob under an advantage of
    0 (every row of a group whose rewards are equal) adds nothing, not 0 * -inf = NaN."""
    return torch.where(coef != 0, coef * lp, 0)
