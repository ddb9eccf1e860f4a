"""Vocab-parallel (tensor-parallel) ops: each rank of a torch.distributed group holds logits
[..., V_local], a shard of the vocabulary; the ops return the statistics of the full row
(docs/math.md §8) through one all-gather per call, and gradients w.r.t. each rank's shard with
no collective in the backward."""

from pg_kernels.parallel.kl_divergence import kl_divergence
from pg_kernels.parallel.token_stats import token_stats

__all__ = ["kl_divergence", "token_stats"]
