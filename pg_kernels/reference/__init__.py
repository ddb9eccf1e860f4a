"""Plain PyTorch oracles, one per op, with the op's signature plus `upcast`.

upcast=True computes in float64 (the truth the tests compare against); upcast=False computes at
the precision a plain PyTorch trainer would use (fp32, fp64 for fp64 logits). They materialize
[N, V] tensors: for testing and as the fallback backend, not for speed.
"""

from pg_kernels.reference.kl_divergence import kl_divergence, rollout_tv
from pg_kernels.reference.mismatch_stats import mismatch_stats, sampled_mismatch
from pg_kernels.reference.pruned_logprob import pruned_logprob
from pg_kernels.reference.step_stats import step_stats
from pg_kernels.reference.token_stats import token_stats
from pg_kernels.reference.topk_kl import topk_kl

__all__ = [
    "kl_divergence",
    "mismatch_stats",
    "pruned_logprob",
    "rollout_tv",
    "sampled_mismatch",
    "step_stats",
    "token_stats",
    "topk_kl",
]
