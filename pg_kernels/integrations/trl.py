"""TRL (1.16.0) drop-ins for `trl.trainer.utils` and `trl.kernels`.

Same names, signatures and argument conventions as TRL, backed by `pg_kernels.token_stats`.
Outputs are fp32 (fp64 for fp64 logits), as TRL's CUDA kernel path returns them (its CPU
fallback returns the logits' dtype). Rows where `row_mask == 0` give 0 with zero gradient, as
in TRL; an index of -100 also gives 0 (TRL raises). See docs/integrations.md.

`patch()` swaps these into an installed TRL (the defining modules and every TRL module that
already imported the names); `unpatch()` restores the originals.
"""

from __future__ import annotations

import torch

from pg_kernels.integrations._common import check_temperature, masked_labels, row_stats, stats
from pg_kernels.integrations._patching import Patcher

__all__ = [
    "entropy_from_logits",
    "fused_selective_log_softmax_and_entropy",
    "patch",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
    "unpatch",
]


def selective_log_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """log softmax(logits / temperature) gathered at `index`.

    Args:
        logits: [..., V] float.
        index: [...] (one token per row) or [..., K] (K tokens per row, e.g. top-K) int.
        temperature: float > 0.
        row_mask: optional, `index`'s shape; where 0 the output is 0.

    Returns:
        `index`'s shape: one token per row fp32 (fp64 for fp64 logits), as TRL's CUDA kernel
        path; K per row in the logits' dtype, as TRL (its kernel takes one token per row only,
        every K call goes through its torch path).
    """
    check_temperature(temperature)
    if index.dim() == logits.dim() - 1:
        labels = masked_labels(index, row_mask)
        return stats(logits, labels, temperature).logprob
    if index.dim() != logits.dim():
        raise ValueError(
            f"index must have logits' leading shape {tuple(logits.shape[:-1])} (+ K), "
            f"got {tuple(index.shape)}"
        )
    # K tokens per row: z[index] - logsumexp(z) with the lse from one pass over the row.
    lse = row_stats(logits, temperature).lse
    z = torch.gather(logits, -1, index.to(torch.int64)).to(lse.dtype) / temperature
    out = z - lse.unsqueeze(-1)
    if row_mask is not None:
        out = out.masked_fill(row_mask == 0, 0.0)
    return out.to(logits.dtype)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) per row, [...] fp32 (fp64 for fp64 logits).

    `chunk_size` is accepted for TRL's signature: one pass needs no chunking.
    """
    del chunk_size
    return row_stats(logits).entropy


def fused_selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`trl.kernels.selective_log_softmax_and_entropy`: (log-prob, entropy) of each row in one pass.

    Args: logits [..., V], index [...], temperature > 0, row_mask [...] or None.
    Returns: two [...] fp32 tensors (fp64 for fp64 logits), 0 where row_mask == 0.
    """
    check_temperature(temperature)
    out = stats(logits, masked_labels(index, row_mask), temperature)
    return out.logprob, out.entropy


def selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`trl.trainer.utils.selective_log_softmax_and_entropy` (note the third positional
    argument, `entropy_requires_grad`, which the `trl.kernels` function does not have)."""
    logprob, entropy = fused_selective_log_softmax_and_entropy(
        logits, index, temperature=temperature, row_mask=row_mask
    )
    return logprob, entropy if entropy_requires_grad else entropy.detach()


_PATCHER = Patcher(
    "trl",
    {
        "trl.trainer.utils": {
            "selective_log_softmax": selective_log_softmax,
            "entropy_from_logits": entropy_from_logits,
            "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy,
            "_fused_logprob_entropy": fused_selective_log_softmax_and_entropy,
        },
        "trl.kernels": {
            "selective_log_softmax_and_entropy": fused_selective_log_softmax_and_entropy,
        },
    },
)


def patch() -> list[str]:
    """Swap the functions above into the installed TRL; returns the names replaced."""
    return _PATCHER.patch()


def unpatch() -> None:
    """Restore every TRL attribute `patch` replaced."""
    _PATCHER.unpatch()
