"""The named outputs of pg_kernels ops. Every tensor field has the shape of `labels` ([...])."""

from __future__ import annotations

from typing import NamedTuple

import torch


def _document_fields(cls: type, **docs: str) -> None:
    """Each field's docstring (help() and IDEs show it instead of "Alias for field number N")."""
    for name, doc in docs.items():
        getattr(cls, name).__doc__ = doc


class TokenStats(NamedTuple):
    """Per-token statistics of p = softmax(logits / temperature) (docs/math.md §2).

    Float fields are fp32 (fp64 for fp64 logits); 0 where labels == ignore_index and NaN on
    rows whose logits hold a NaN or +inf or are all -inf.
    """

    logprob: torch.Tensor
    entropy: torch.Tensor
    collision: torch.Tensor
    lgp: torch.Tensor
    lse: torch.Tensor
    max_prob: torch.Tensor
    argmax: torch.Tensor

    @property
    def lgp_norm(self) -> torch.Tensor:
        """sqrt(lgp): the norm of the logit update per unit advantage."""
        return self.lgp.sqrt()

    @property
    def renyi2(self) -> torch.Tensor:
        """Renyi-2 entropy -log C; not differentiable, 0 where labels == ignore_index (C = 0
        there; a kept row has C >= 1 / V) and NaN on NaN rows, as the fields."""
        c = self.collision.detach()
        return -torch.where(c == 0, torch.ones_like(c), c).log()


_document_fields(
    TokenStats,
    logprob="log p_c; differentiable",
    entropy="Shannon entropy H(p), nats; differentiable",
    collision="C = sum p^2; differentiable",
    lgp="logit-gradient proxy 1 - 2 p_c + C = |d log p_c / dz|^2; not differentiable",
    lse="logsumexp(logits / temperature); differentiable",
    max_prob="max_j p_j; not differentiable",
    argmax="int64, first index of the max logit (-1 on NaN rows)",
)


class MismatchStats(NamedTuple):
    """Training-vs-rollout mismatch per token (docs/math.md §5), with
    delta = logprob - rollout_logprobs."""

    logprob: torch.Tensor
    log_ratio: torch.Tensor
    ratio: torch.Tensor
    k1: torch.Tensor
    k2: torch.Tensor
    k3: torch.Tensor
    abs_log_ratio: torch.Tensor
    chi2: torch.Tensor
    tis_weight: torch.Tensor
    icepop_weight: torch.Tensor
    token_kl: torch.Tensor | None
    token_tv: torch.Tensor | None


_document_fields(
    MismatchStats,
    logprob="log pi_theta(c); differentiable",
    log_ratio="delta",
    ratio="rho = exp(clamp(delta, -20, 20))",
    k1="-delta",
    k2="delta^2 / 2",
    k3="rho - 1 - delta; E_roll[k3] = KL(pi_roll || pi_theta)",
    abs_log_ratio="|delta|",
    chi2="(rho - 1)^2",
    tis_weight="min(rho, tis_cap)",
    icepop_weight="rho * 1[icepop_low <= rho <= icepop_high]",
    token_kl="exact KL(pi_roll || pi_theta), when rollout logits are given",
    token_tv="exact total variation, when rollout logits are given",
)


class PrunedLogprob(NamedTuple):
    """Log-prob on the safe vocabulary S = {v: p_v >= alpha max p} plus the label
    (docs/math.md §6)."""

    logprob: torch.Tensor
    in_safe: torch.Tensor
    tail_mass: torch.Tensor


_document_fields(
    PrunedLogprob,
    logprob="z_c - logsumexp_S z; differentiable",
    in_safe="bool: the label met the threshold on its own",
    tail_mass="1 - p(S)",
)


class StepStats(NamedTuple):
    """Every per-token statistic of a training step from one read of each logits tensor
    (`pg_kernels.step_stats`, docs/math.md §9)."""

    token: TokenStats
    mismatch: MismatchStats | None
    kl: torch.Tensor | None


_document_fields(
    StepStats,
    token="token_stats of the logits; logprob, entropy, collision and lse differentiable",
    mismatch="mismatch_stats against the rollout (when rollout_logprobs is given); token_kl and "
    "token_tv when rollout_logits is given",
    kl="KL to the reference logits (when given), direction as asked; differentiable",
)


class TokenLoss(NamedTuple):
    """A per-token loss over token_stats from hidden states, its gradients formed in the
    forward (`pg_kernels.token_loss_from_hidden`)."""

    loss: torch.Tensor
    stats: TokenStats


_document_fields(
    TokenLoss,
    loss="0-d: the sum of loss_fn over the chunks; differentiable w.r.t. hidden, weight, bias",
    stats="TokenStats of every row, detached (for metrics; the loss carries the gradients)",
)


class KLLoss(NamedTuple):
    """A per-row loss of the KL between two projections of hidden states, its gradients formed
    in the forward (`pg_kernels.kl_loss_from_hidden`)."""

    loss: torch.Tensor
    kl: torch.Tensor


_document_fields(
    KLLoss,
    loss="0-d: the sum of loss_fn over the chunks; differentiable w.r.t. hidden, weight, bias "
    "(and the teacher's, where they require grad)",
    kl="[...] KL of every row, detached (for metrics; the loss carries the gradients)",
)
