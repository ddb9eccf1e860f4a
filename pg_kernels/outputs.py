"""The named outputs of pg_kernels ops. Every tensor field has the shape of `labels` ([...])."""

from __future__ import annotations

from typing import NamedTuple

import torch


class TokenStats(NamedTuple):
    """Per-token statistics of p = softmax(logits / temperature) (SPEC section 2).

    Float fields are fp32 (fp64 for fp64 logits); 0 where labels == ignore_index and NaN on
    rows whose logits hold a NaN or +inf or are all -inf.
    """

    logprob: torch.Tensor  # log p_c; differentiable
    entropy: torch.Tensor  # Shannon entropy H(p), nats; differentiable
    collision: torch.Tensor  # C = sum p^2; differentiable
    lgp: torch.Tensor  # logit-gradient proxy 1 - 2 p_c + C = |d log p_c / dz|^2; not differentiable
    lse: torch.Tensor  # logsumexp(logits / temperature); differentiable
    max_prob: torch.Tensor  # max_j p_j; not differentiable
    argmax: torch.Tensor  # int64, first index of the max logit (-1 on NaN rows)

    @property
    def lgp_norm(self) -> torch.Tensor:
        """sqrt(lgp): the norm of the logit update per unit advantage."""
        return self.lgp.sqrt()

    @property
    def renyi2(self) -> torch.Tensor:
        """Renyi-2 entropy -log C."""
        return -self.collision.log()


class MismatchStats(NamedTuple):
    """Training-vs-rollout mismatch per token (SPEC section 5), with delta = logprob - rollout."""

    logprob: torch.Tensor  # log pi_theta(c); differentiable
    log_ratio: torch.Tensor  # delta
    ratio: torch.Tensor  # rho = exp(clamp(delta, -20, 20))
    k1: torch.Tensor  # -delta
    k2: torch.Tensor  # delta^2 / 2
    k3: torch.Tensor  # rho - 1 - delta; E_roll[k3] = KL(pi_roll || pi_theta)
    abs_log_ratio: torch.Tensor  # |delta|
    chi2: torch.Tensor  # (rho - 1)^2
    tis_weight: torch.Tensor  # min(rho, tis_cap)
    icepop_weight: torch.Tensor  # rho * 1[icepop_low <= rho <= icepop_high]
    token_kl: torch.Tensor | None  # exact KL(pi_roll || pi_theta), when rollout logits are given
    token_tv: torch.Tensor | None  # exact total variation, when rollout logits are given


class PrunedLogprob(NamedTuple):
    """Log-prob on the safe vocabulary S = {v: p_v >= alpha max p} plus the label (SPEC 6)."""

    logprob: torch.Tensor  # z_c - logsumexp_S z; differentiable
    in_safe: torch.Tensor  # bool: the label met the threshold on its own
    tail_mass: torch.Tensor  # 1 - p(S)
