"""verl (0.9.1) drop-ins: `verl.utils.torch_functional`, `FusedLinearForPPO`, `kl_penalty`.

Same names, signatures and output dtypes as verl, backed by `pg_kernels.token_stats` (one
pass over the logits, gradients without [N, V] temporaries). Differences a user switching
would meet are listed in docs/integrations.md; in short: label -100 gives 0 (verl's torch path
raises an index error), nothing is done in place, and `FusedLinearForPPO` divides by the
temperature in fp32 after the matmul (verl divides the bf16 logits).

`patch()` swaps these into an installed verl (the defining modules and every verl module that
already imported the names); `unpatch()` restores the originals. Patch before building the
engine: verl's FSDP engine stores `entropy_from_logits` on itself at construction.
"""

from __future__ import annotations

import numpy as np
import torch

from pg_kernels import token_stats_from_hidden
from pg_kernels.algorithms import otb_advantages
from pg_kernels.algorithms.estimators import sampled_kl
from pg_kernels.integrations._common import row_stats, stats
from pg_kernels.integrations._patching import Patcher

__all__ = [
    "FusedLinearForPPO",
    "calculate_sum_pi_squared_from_logits",
    "compute_optimal_token_baseline_advantage",
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
    "kl_penalty",
    "kl_penalty_forward",
    "logprobs_from_logits",
    "patch",
    "unpatch",
]


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True
) -> torch.Tensor:
    """log softmax(logits)[labels], [...] fp32 (fp64 for fp64 logits), as verl's flash-attn path.

    Args:
        logits: [..., V] float. Not modified (`inplace_backward` is accepted and ignored: the
            backward already writes one gradient tensor and nothing else).
        labels: [...] int; -100 gives 0 with zero gradient.
    """
    del inplace_backward
    return stats(logits, labels).logprob


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax(logits) per row, [...] in the logits' dtype (as verl)."""
    return row_stats(logits).entropy.to(logits.dtype)


def entropy_from_logits_with_chunking(logits: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    """verl's chunked entropy: fp32 [...] (verl: fp32 [N] of 2-d logits). No chunking needed."""
    del chunk_size
    return row_stats(logits).entropy.float()


def calculate_sum_pi_squared_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """sum_j p_j^2 per row, [...] in the logits' dtype (as verl), differentiable."""
    return row_stats(logits).collision.to(logits.dtype)


class FusedLinearForPPO(torch.nn.Module):
    """verl's `FusedLinearForPPO` (lm head + log-prob + entropy, chunked over tokens).

    `token_stats_from_hidden` with `chunk_size` rows per chunk: each chunk's logits are
    computed, reduced and recomputed in the backward, so at most one chunk's [C, V] logits is
    alive at a time, as in verl. `impl_backend` is accepted for verl's signature; every backend
    runs the same fused op.
    """

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        if impl_backend not in ("torch", "liger"):
            raise ValueError(
                f"Unsupported FusedLinearForPPO backend: {impl_backend}. Choose 'torch' or 'liger'."
            )
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(
        self,
        hidden_states: torch.Tensor,
        vocab_weights: torch.Tensor,
        input_ids: torch.Tensor,
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: hidden_states [..., H], vocab_weights [V, H], input_ids [...] (-100 gives 0).

        Returns (log_probs fp32 [...], entropy [...] in hidden_states' dtype), as verl.
        """
        if tuple(input_ids.shape) != tuple(hidden_states.shape[:-1]):
            raise ValueError(
                f"input_ids shape {tuple(input_ids.shape)} must match hidden_states shape "
                f"{tuple(hidden_states.shape[:-1])}"
            )
        stats = token_stats_from_hidden(
            hidden_states, vocab_weights, input_ids.to(torch.int64), temperature=temperature,
            chunk_size=self.chunk_size,
        )  # fmt: skip
        return stats.logprob, stats.entropy.to(hidden_states.dtype)


_MODES = {"kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


def kl_penalty_forward(
    logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str
) -> torch.Tensor:
    """verl's per-token KL estimate of KL(pi || pi_ref) from tokens sampled from pi.

    Modes "kl"/"k1" (logprob - ref_logprob), "abs", "mse"/"k2", "low_var_kl"/"k3" (with verl's
    clamps: log-ratio to +-20, estimate to +-10); "full" raises as in verl. The two log-prob
    tensors broadcast, as in verl.
    """
    logprob, ref_logprob = torch.broadcast_tensors(logprob, ref_logprob)
    if kl_penalty == "abs":
        return (logprob - ref_logprob).abs()
    if kl_penalty == "full":
        raise NotImplementedError(
            'kl_penalty "full" needs both logit tensors: use pg_kernels.kl_divergence'
        )
    if kl_penalty not in _MODES:
        raise NotImplementedError(f"kl_penalty: unknown mode {kl_penalty!r}")
    # sampled_kl computes bf16 / fp16 in fp32; verl returns the inputs' dtype.
    out = sampled_kl(logprob, ref_logprob, _MODES[kl_penalty], clamp=True)
    return out.to(torch.promote_types(logprob.dtype, ref_logprob.dtype))


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """verl's `kl_penalty`: a trailing "+" (e.g. "k3+") keeps the mode's value but takes the
    gradient of k2 (straight-through), whose gradient is the unbiased KL gradient."""
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    logprob, ref_logprob = torch.broadcast_tensors(logprob, ref_logprob)
    value = kl_penalty_forward(logprob, ref_logprob, base)
    if not kl_penalty.endswith("+") or kl_penalty in ("mse", "k2"):
        return value
    k2 = sampled_kl(logprob, ref_logprob, "k2").to(value.dtype)
    return k2 - k2.detach() + value.detach()


def compute_optimal_token_baseline_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    old_log_probs: torch.Tensor,
    sum_pi_squared: torch.Tensor,
    rollout_is_weights: torch.Tensor | None = None,
    handle_zero_tail: bool = True,
    epsilon: float = 1e-8,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's Optimal Token Baseline advantage estimator ("optimal_token_baseline"), computed
    by `pg_kernels.algorithms.otb_advantages`: one batched pass over the groups instead of a
    Python loop per prompt, no host sync.

    The per-token weight is verl's 1 - 2 exp(old_log_probs) + sum_pi_squared (token_stats'
    lgp, from the rollout-time log-prob and the `calculate_sum_pi_squared_from_logits` output);
    `index` holds any hashable prompt ids. Returns (advantages, returns) [bs, T], returns the
    reward-to-go, as verl does. Extra keyword arguments (verl passes its config) are ignored.
    """
    del kwargs
    with torch.no_grad():
        mask = response_mask
        returns = (token_level_rewards * mask).flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1])
        lgp = 1 - 2 * torch.exp(old_log_probs) + sum_pi_squared
        _, groups = np.unique(np.asarray(index), return_inverse=True)
        group_ids = torch.as_tensor(groups.reshape(-1), device=lgp.device)
        advantages = otb_advantages(
            returns, lgp, mask, group_ids, is_weights=rollout_is_weights,
            handle_zero_tail=handle_zero_tail, eps=epsilon,
        )  # fmt: skip
    return advantages, returns


_PATCHER = Patcher(
    "verl",
    {
        "verl.utils.torch_functional": {
            "logprobs_from_logits": logprobs_from_logits,
            "entropy_from_logits": entropy_from_logits,
            "entropy_from_logits_with_chunking": entropy_from_logits_with_chunking,
            "calculate_sum_pi_squared_from_logits": calculate_sum_pi_squared_from_logits,
        },
        "verl.utils.experimental.torch_functional": {"FusedLinearForPPO": FusedLinearForPPO},
        "verl.trainer.ppo.core_algos": {
            "kl_penalty": kl_penalty,
            "kl_penalty_forward": kl_penalty_forward,
            # also swapped in verl's advantage-estimator registry (a dict of these functions)
            "compute_optimal_token_baseline_advantage": compute_optimal_token_baseline_advantage,
        },
    },
)


def patch() -> list[str]:
    """Swap the functions above into the installed verl; returns the names replaced."""
    return _PATCHER.patch()


def unpatch() -> None:
    """Restore every verl attribute `patch` replaced."""
    _PATCHER.unpatch()
