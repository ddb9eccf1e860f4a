"""slime drop-in for `slime.utils.ppo_utils.calculate_log_probs_and_entropy` (single device).

slime computes, per packed token row, the log-prob of the target and the entropy of the full
distribution; with top-p replay (`log_prob_keep_mask`, [T, V] bool, True = in the rollout's
nucleus) the log-prob is renormalized over the kept tokens plus the target itself, while the
entropy stays the full-vocabulary one. Here:

- no mask: one `token_stats` pass gives both;
- with a mask: the log-prob comes from `token_stats` on `logits` with -inf outside keep | target
  (one masked [T, V] copy; `pruned_logprob`'s threshold set cannot express an arbitrary
  nucleus chosen by the rollout engine), the entropy from a pass over the unmasked logits.

Vocabulary-parallel logits (a tensor-parallel group of more than one rank) raise
NotImplementedError until `pg_kernels.parallel` provides the sharded reduction.
slime's DPPO directional moment (`with_dppo_directional_moment`) is not offered.
"""

from __future__ import annotations

import torch

from pg_kernels import token_stats
from pg_kernels.integrations._common import row_stats

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
        tp_group: tensor-parallel process group; only a group of one rank (or None) works.
        with_entropy: also return the entropy.
        chunk_size: accepted for slime's signature; one pass needs no chunking.
        log_prob_keep_mask: optional [T, V] bool, True = token kept for the log-prob.
        with_entropy_grad: False detaches the entropy.

    Returns:
        (log_prob [T, 1] fp32, entropy [T] fp32 or None); for T = 0, a [0] log_prob.
    """
    del chunk_size
    if _group_size(tp_group) > 1:
        raise NotImplementedError(
            "slime.calculate_log_probs_and_entropy: vocabulary-parallel logits (tp_group of "
            f"{_group_size(tp_group)} ranks) need pg_kernels.parallel, which is not available "
            "yet; run with tensor parallelism 1 or keep slime's own function"
        )
    if logits.dim() != 2 or tokens.dim() != 1 or tokens.shape[0] != logits.shape[0]:
        raise ValueError(
            f"logits must be [T, V] and tokens [T], got {tuple(logits.shape)} and "
            f"{tuple(tokens.shape)}"
        )
    if logits.shape[0] == 0:
        log_prob = logits.new_zeros((0,))
        return log_prob, (logits.new_zeros((0,)) if with_entropy else None)
    tokens = tokens.to(torch.int64)
    entropy = None
    if log_prob_keep_mask is None:
        out = token_stats(logits, tokens)
        log_prob = out.logprob
        if with_entropy:
            entropy = out.entropy
    else:
        if tuple(log_prob_keep_mask.shape) != tuple(logits.shape):
            raise ValueError(
                f"log_prob_keep_mask must have the logits' shape {tuple(logits.shape)}, "
                f"got {tuple(log_prob_keep_mask.shape)}"
            )
        keep = log_prob_keep_mask.to(torch.bool).scatter(-1, tokens.unsqueeze(-1), True)
        masked = logits.masked_fill(~keep, -torch.inf)
        log_prob = token_stats(masked, tokens).logprob
        if with_entropy:
            entropy = row_stats(logits).entropy
    if entropy is not None and not with_entropy_grad:
        entropy = entropy.detach()
    return log_prob.float().unsqueeze(-1), None if entropy is None else entropy.float()
