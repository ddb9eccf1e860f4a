"""slime drop-in for `slime.utils.ppo_utils.calculate_log_probs_and_entropy` (single device).

slime computes, per packed token row, the log-prob of the target and the entropy of the full
distribution; with top-p replay (`log_prob_keep_mask`, [T, V] bool, True = in the rollout's
nucleus) the log-prob is renormalized over the kept tokens plus the target itself, while the
entropy stays the full-vocabulary one. Here:

- no mask: one `token_stats` pass gives both;
- with a mask: the log-prob comes from `token_stats` on `logits` with -inf outside keep | target
  (one masked [T, V] copy; `pruned_logprob`'s threshold set cannot express an arbitrary
  nucleus chosen by the rollout engine), the entropy from a pass over the unmasked logits.

Vocabulary-parallel logits (`tp_group` of more than one rank: each rank holds its equal shard
[T, V / tp] of the vocabulary, Megatron's layout, and the global target ids) go through
`pg_kernels.parallel.token_stats`: one all-gather of a few numbers per row, no [T, V] gather;
the keep-mask is then each rank's [T, V / tp] shard of it.
slime's DPPO directional moment (`with_dppo_directional_moment`) is not offered.
"""

from __future__ import annotations

import torch

from pg_kernels import parallel, token_stats
from pg_kernels.integrations._common import any_layout, row_stats

__all__ = ["calculate_log_probs_and_entropy"]


def _group_size(tp_group) -> int:
    if tp_group is None:
        return 1
    if hasattr(tp_group, "size"):
        return int(tp_group.size())
    return torch.distributed.get_world_size(group=tp_group)


def calculate_log_probs_and_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    tp_group=None,
    with_entropy: bool = False,
    chunk_size: int = -1,
    log_prob_keep_mask: torch.Tensor | None = None,
    with_entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each target and (optionally) the entropy, as slime returns them.

    Args:
        logits: [T, V] float (slime passes fp32 logits already divided by the temperature).
        tokens: [T] int, the targets.
        tp_group: tensor-parallel process group; with more than one rank, `logits` (and the
            keep-mask) are this rank's equal shard of the vocabulary and `tokens` global ids.
        with_entropy: also return the entropy.
        chunk_size: accepted for slime's signature; one pass needs no chunking.
        log_prob_keep_mask: optional [T, V] bool, True = token kept for the log-prob.
        with_entropy_grad: False detaches the entropy.

    Returns:
        (log_prob [T, 1] fp32, entropy [T] fp32 or None); for T = 0, a [0] log_prob.
    """
    del chunk_size
    tp = _group_size(tp_group) > 1
    if logits.dim() != 2 or tokens.dim() != 1 or tokens.shape[0] != logits.shape[0]:
        raise ValueError(
            f"logits must be [T, V] and tokens [T], got {tuple(logits.shape)} and "
            f"{tuple(tokens.shape)}"
        )
    if logits.shape[0] == 0:
        log_prob = logits.new_zeros((0,))
        return log_prob, (logits.new_zeros((0,)) if with_entropy else None)
    tokens = tokens.to(torch.int64)
    logits = any_layout(logits)  # as slime takes them

    def stats(x):
        return parallel.token_stats(x, tokens, group=tp_group) if tp else token_stats(x, tokens)

    entropy = None
    if log_prob_keep_mask is None:
        out = stats(logits)
        log_prob = out.logprob
        if with_entropy:
            entropy = out.entropy
    else:
        if tuple(log_prob_keep_mask.shape) != tuple(logits.shape):
            raise ValueError(
                f"log_prob_keep_mask must have the logits' shape {tuple(logits.shape)}, "
                f"got {tuple(log_prob_keep_mask.shape)}"
            )
        # The target is always kept: on the shard that holds it (every row's, without tp).
        v_local = logits.shape[-1]
        local = tokens - (tp_group.rank() * v_local if tp else 0)
        owned = (local >= 0) & (local < v_local)
        keep = log_prob_keep_mask.to(torch.bool).clone()
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        keep[rows[owned], local[owned]] = True
        masked = logits.masked_fill(~keep, -torch.inf)
        log_prob = stats(masked).logprob
        if with_entropy:
            entropy = stats(logits).entropy if tp else row_stats(logits).entropy
    if entropy is not None and not with_entropy_grad:
        entropy = entropy.detach()
    return log_prob.float().unsqueeze(-1), None if entropy is None else entropy.float()
