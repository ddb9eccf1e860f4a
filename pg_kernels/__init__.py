"""pg_kernels: fused one-pass kernels for policy-gradient RL over vocabulary-sized logits."""

from pg_kernels import parallel
from pg_kernels._backend import env_report
from pg_kernels.ops._common import check_labels
from pg_kernels.ops.kl_divergence import kl_divergence
from pg_kernels.ops.kl_divergence_from_hidden import kl_divergence_from_hidden
from pg_kernels.ops.kl_loss_from_hidden import kl_loss_from_hidden
from pg_kernels.ops.mismatch_stats import mismatch_stats
from pg_kernels.ops.pruned_logprob import pruned_logprob
from pg_kernels.ops.step_stats import step_stats
from pg_kernels.ops.token_loss_from_hidden import token_loss_from_hidden
from pg_kernels.ops.token_stats import token_stats
from pg_kernels.ops.token_stats_from_hidden import token_stats_from_hidden
from pg_kernels.ops.topk_kl import topk_kl
from pg_kernels.outputs import (
    KLLoss,
    MismatchStats,
    PrunedLogprob,
    StepStats,
    TokenLoss,
    TokenStats,
)

__version__ = "0.1.0"

__all__ = [
    "KLLoss",
    "MismatchStats",
    "PrunedLogprob",
    "StepStats",
    "TokenLoss",
    "TokenStats",
    "check_labels",
    "env_report",
    "kl_divergence",
    "kl_divergence_from_hidden",
    "kl_loss_from_hidden",
    "mismatch_stats",
    "parallel",
    "pruned_logprob",
    "step_stats",
    "token_loss_from_hidden",
    "token_stats",
    "token_stats_from_hidden",
    "topk_kl",
]
