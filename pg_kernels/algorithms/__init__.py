"""Sequence-level methods built on per-token tensors (baselines, masks, policy losses).

Plain PyTorch on padded [B, T] tensors with a mask (or packed rows, see `packing`): advantages,
sequence masks, policy losses, a response-length lr schedule and mismatch metrics (docs/math.md
section 7). No host syncs, no Python loops over rows, groups, steps or turns. Arithmetic runs
in `_common.compute_dtype` (the inputs' promoted float dtype, at least float32), and float
outputs come back in it: bf16 / fp16 in, float32 out; float64 in, float64 out (docs/math.md §0).

Group and step statistics are segment sums (`index_add`) over dense ids: on CPU they are
deterministic; on CUDA `index_add` adds with atomics, so float sums may differ in the last bits
from run to run unless `torch.use_deterministic_algorithms(True)` is set (torch then takes its
deterministic index_add path).
"""

from pg_kernels.algorithms.advantages import (
    empg_advantages,
    group_advantages,
    otb_advantages,
    trloo_advantages,
    turns_to_tokens,
)
from pg_kernels.algorithms.estimators import sampled_kl
from pg_kernels.algorithms.losses import hybrid_il_rl_loss, policy_loss
from pg_kernels.algorithms.masks import geometric_rejection, trm_mask
from pg_kernels.algorithms.metrics import mismatch_metrics
from pg_kernels.algorithms.packing import (
    compact_rows,
    packed_to_padded,
    padded_to_packed,
    uncompact_rows,
)
from pg_kernels.algorithms.schedules import ResponseLengthLRScheduler

__all__ = [
    "ResponseLengthLRScheduler",
    "compact_rows",
    "empg_advantages",
    "geometric_rejection",
    "group_advantages",
    "hybrid_il_rl_loss",
    "mismatch_metrics",
    "otb_advantages",
    "packed_to_padded",
    "padded_to_packed",
    "policy_loss",
    "sampled_kl",
    "trloo_advantages",
    "trm_mask",
    "turns_to_tokens",
    "uncompact_rows",
]
